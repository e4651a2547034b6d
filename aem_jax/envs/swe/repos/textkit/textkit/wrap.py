"""Line wrapping and truncation."""


def truncate(text, limit, suffix="..."):
    """Cuts text to at most limit characters, ending with suffix when cut."""
    if len(text) <= limit:
        return text
    if limit <= len(suffix):
        return suffix[:limit]
    return text[: limit - len(suffix)] + suffix


def wrap(text, width):
    """Greedy word wrap: lines of at most width characters (long words alone)."""
    if width < 1:
        raise ValueError("width must be positive")
    lines = []
    current = ""
    for word in text.split():
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= width:
            current = current + " " + word
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def indent(lines, prefix="    ", skip_first=False):
    """Prefixes every line (optionally not the first)."""
    out = []
    for index, line in enumerate(lines):
        if skip_first and index == 0:
            out.append(line)
        else:
            out.append(prefix + line)
    return out
