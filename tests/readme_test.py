"""Executes the README's code examples, so the documentation stays true."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _examples():
    text = README.read_text()
    return re.findall(r"<!-- readme-example -->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_example():
    examples = _examples()
    assert examples, "README.md lost its <!-- readme-example --> block"
    assert "from aem_jax import objectives" in examples[0]


def test_readme_examples_run(capsys):
    for code in _examples():
        namespace = {"__name__": "readme_example"}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert "mean reward after 100 steps: 1.00" in capsys.readouterr().out
