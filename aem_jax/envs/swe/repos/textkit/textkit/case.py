"""Case conversion helpers."""
import re


def slugify(text, sep="-"):
    """Lower-cases text and joins its alphanumeric words with sep."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return sep.join(words)


def camel_to_snake(name):
    """Converts CamelCase or camelCase to snake_case."""
    out = []
    for index, char in enumerate(name):
        if char.isupper() and index > 0:
            out.append("_")
        out.append(char.lower())
    return "".join(out)


def snake_to_camel(name, upper_first=True):
    """Converts snake_case to CamelCase (or camelCase)."""
    parts = [p for p in name.split("_") if p]
    if not parts:
        return ""
    head = parts[0].capitalize() if upper_first else parts[0].lower()
    return head + "".join(p.capitalize() for p in parts[1:])


def title_case(text, small_words=("a", "an", "the", "of", "and")):
    """Capitalises words except small words that are not first."""
    words = text.split()
    result = []
    for index, word in enumerate(words):
        if index > 0 and word.lower() in small_words:
            result.append(word.lower())
        else:
            result.append(word[:1].upper() + word[1:].lower())
    return " ".join(result)
