"""Each bad declaration: the script exits 2 with one line naming the task, the file and the item; nothing written."""
import pytest
import yaml

from tests.declared.helpers import outputs, run_script
from tests.declared.test_declared_data import bad_cases

CASES = ["missing file", "missing column", "label outside the label names", "empty split", "example in two splits"]


def command(tmp_path, case):
    change, message = bad_cases(tmp_path)[case]
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"name": "reviews", **change}, sort_keys=False))
    return ["tasks=own", f"tasks.declared={tmp_path}/task.yaml", "model=tiny_bert", f"paths.data={tmp_path}/data",
            *outputs(tmp_path)], message


@pytest.mark.parametrize("case", CASES)
def test_bad_declaration_refused_before_anything(tmp_path, case):
    args, message = command(tmp_path, case)
    proc = run_script("eval_scripts/run_suite.py", *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr
    for out in ("ck", "res", "data"):
        assert not (tmp_path / out).exists(), out
    print(f"| {case} | `run_suite.py {' '.join(a for a in args[:2])}` | `{proc.stderr.strip()}` |")
