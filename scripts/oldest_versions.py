"""Print pyproject.toml's lower bounds as pins (``name>=v`` -> ``name==v``), torch's left out
(the Makefile pins it): the requirements of ``make test-oldest``, read from the one place that
states them."""
import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# quoted requirements with a lower bound, in `dependencies` and the optional (test) ones (not
# the build system's, which pip chooses for itself)
text = PYPROJECT.read_text()
project = text[text.index("[project]"):]
pins = re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)"', project.split("[project.scripts]")[0])
if not pins:
    sys.exit(f"no lower bounds found in {PYPROJECT}")
print("\n".join(f"{name}=={version}" for name, version in pins if name != "torch"))
