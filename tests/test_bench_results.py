"""benchmarks/common.py: where results go. A benchmark rewrites its own file as it saves after each row; a later
process (another benchmark of the same name, or a second run in the same folder) gets _run2, _run3, ..."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402


def test_write_results_never_overwrites_an_earlier_process(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_PATHS", {})
    first = common.write_results("e2e", {"rows": [1]}, tmp_path)
    again = common.write_results("e2e", {"rows": [1, 2]}, tmp_path)          # same process: same file, rewritten
    assert first == again and first.name == f"e2e_{common.gpu_tag()}_{json.loads(first.read_text())['env']['date']}.json"
    assert json.loads(first.read_text())["rows"] == [1, 2]
    other = common.write_results("e2e_14b", {"rows": []}, tmp_path)         # another name: its own file
    assert other != first
    monkeypatch.setattr(common, "_PATHS", {})                                # a new process
    second = common.write_results("e2e", {"rows": [3]}, tmp_path)
    monkeypatch.setattr(common, "_PATHS", {})
    third = common.write_results("e2e", {"rows": [4]}, tmp_path)
    assert second.name == first.name.replace(".json", "_run2.json")
    assert third.name == first.name.replace(".json", "_run3.json")
    assert json.loads(first.read_text())["rows"] == [1, 2] and json.loads(second.read_text())["rows"] == [3]
    assert not list(tmp_path.glob("*.tmp"))
