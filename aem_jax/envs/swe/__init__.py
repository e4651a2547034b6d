"""SWE environment."""
