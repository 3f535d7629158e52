"""The README's Python example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(include_launched=False):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # Blocks that only make sense inside a launched job say so on their first line.
    return [b for b in blocks if include_launched or not b.startswith("# needs: torchrun")]


def test_readme_has_a_python_example():
    assert _python_blocks(), "README.md lost its Python example"


def test_only_launched_examples_are_exempt():
    assert len(_python_blocks(include_launched=True)) - len(_python_blocks()) <= 1


def test_readme_python_examples_run():
    for i, block in enumerate(_python_blocks()):
        code = compile(block, f"README.md python block {i}", "exec")
        exec(code, {"__name__": f"readme_{i}"})
