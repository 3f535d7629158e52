"""The README's Python example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_example():
    assert _python_blocks(), "README.md lost its Python example"


def test_readme_python_examples_run():
    for i, block in enumerate(_python_blocks()):
        code = compile(block, f"README.md python block {i}", "exec")
        exec(code, {"__name__": f"readme_{i}"})
