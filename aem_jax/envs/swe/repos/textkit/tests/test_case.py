from textkit.case import camel_to_snake, slugify, snake_to_camel, title_case


def test_slugify_basic():
    assert slugify("Hello, World!") == "hello-world"


def test_slugify_separator():
    assert slugify("A  b c", sep="_") == "a_b_c"


def test_slugify_empty():
    assert slugify("!!!") == ""


def test_camel_to_snake():
    assert camel_to_snake("HttpServerError") == "http_server_error"


def test_camel_to_snake_lower_first():
    assert camel_to_snake("parseJson") == "parse_json"


def test_snake_to_camel():
    assert snake_to_camel("http_server_error") == "HttpServerError"


def test_snake_to_camel_lower_first():
    assert snake_to_camel("parse_json_file", upper_first=False) == "parseJsonFile"


def test_snake_to_camel_empty():
    assert snake_to_camel("__") == ""


def test_title_case():
    assert title_case("the lord of the rings") == "The Lord of the Rings"


def test_title_case_mixed():
    assert title_case("a TALE and a song") == "A Tale and a Song"
