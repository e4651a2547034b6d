from textkit.count import average_word_length, char_histogram, most_common, word_counts


def test_word_counts():
    assert word_counts("The cat, the hat.") == {"the": 2, "cat": 1, "hat": 1}


def test_word_counts_skips_punctuation_only():
    assert word_counts("-- ... !") == {"--": 1}


def test_most_common():
    assert most_common("b a b c a b") == ["b"]


def test_most_common_ties():
    assert most_common("y x y x z", n=2) == ["x", "y"]


def test_char_histogram():
    assert char_histogram("Aa b!") == {"a": 2, "b": 1}


def test_char_histogram_all_chars():
    assert char_histogram("a a", letters_only=False) == {"a": 2, " ": 1}


def test_average_word_length():
    assert average_word_length("ab abcd") == 3.0


def test_average_word_length_empty():
    assert average_word_length("") == 0.0
