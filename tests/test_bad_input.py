"""Missing pieces get one clear sentence that says how to fix them."""
import subprocess
import sys

import pytest

from reuseport_ctl.errors import UserError
from reuseport_ctl.kernel import headers

NO_BCC = ("import sys; sys.modules['bcc'] = None\n"
          "from reuseport_ctl.cli import main; main()")


def test_missing_bcc_says_run_bootstrap(netns):
    p = subprocess.run([sys.executable, "-c", NO_BCC, "run", "--workers", "2",
                        "--policy", "round-robin", "--load", "10"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "bcc" in lines[0] and "scripts/bootstrap" in lines[0], lines


def test_cbpf_policy_works_without_bcc(netns):
    p = subprocess.run([sys.executable, "-c", NO_BCC, "run", "--workers", "2",
                        "--policy", "mod", "--load", "20", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert '"policy": "mod"' in p.stdout


def test_missing_header_tree_says_run_bootstrap(monkeypatch, tmp_path):
    if headers.Path(f"/lib/modules/{headers.os.uname().release}/build").is_dir():
        pytest.skip("this kernel has its own header tree")
    monkeypatch.setattr(headers, "SRC", tmp_path)
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    with pytest.raises(UserError, match="scripts/bootstrap"):
        headers.find_header_tree()
