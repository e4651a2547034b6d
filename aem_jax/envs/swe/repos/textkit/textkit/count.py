"""Word statistics."""


def word_counts(text):
    """Counts lower-cased words, ignoring surrounding punctuation."""
    counts = {}
    for raw in text.split():
        word = raw.strip(".,;:!?\"'()").lower()
        if not word:
            continue
        counts[word] = counts.get(word, 0) + 1
    return counts


def most_common(text, n=1):
    """The n most common words, ties broken alphabetically."""
    counts = word_counts(text)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:n]]


def char_histogram(text, letters_only=True):
    """Counts characters (letters only by default), lower-cased."""
    histogram = {}
    for char in text.lower():
        if letters_only and not char.isalpha():
            continue
        histogram[char] = histogram.get(char, 0) + 1
    return histogram


def average_word_length(text):
    """Mean length of the words of text (0.0 for no words)."""
    counts = word_counts(text)
    total_words = sum(counts.values())
    if total_words == 0:
        return 0.0
    total_chars = sum(len(word) * count for word, count in counts.items())
    return total_chars / total_words
