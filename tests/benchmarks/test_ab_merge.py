"""benchmarks/ab_merge.py: both sides run the method from their own source tree."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_both_sides_time_the_method_from_their_own_tree():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_merge.py"), "task_arithmetic",
                          "--before-rev", "HEAD", "--model", "tiny", "--runs", "2", "--rounds", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[1:]] == ["round 1 before", "round 1 after", "round 2 after",
                                                     "round 2 before"]
    assert all(ln.endswith(" s") and ln.count(",") == 1 for ln in lines[1:])  # two timed calls each
