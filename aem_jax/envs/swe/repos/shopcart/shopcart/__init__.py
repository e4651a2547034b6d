"""Shopping cart with integer-cent prices."""
