"""Missing pieces get one clear sentence that says how to fix them."""
import json
import os
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


# Table-driven: verb, arguments, expected exit code, words the one-line
# error must hold. Each is refused before any work starts.
REFUSED = [
    (["bench", "--plot", "/nonexistent/x.png"], 1, "/nonexistent does not exist"),
    (["churn", "--plot", "/nonexistent/x.png"], 1, "/nonexistent does not exist"),
    (["remap", "--plot", "/nonexistent/x.png"], 1, "/nonexistent does not exist"),
    (["udp-lookup", "--plot", "/nonexistent/x.png"], 1, "/nonexistent does not exist"),
    (["bench", "--plot", "/tmp"], 1, "ending in .png"),
    (["remap", "--remove", "99", "--sizes", "2-3"], 1, "slots 0-2"),
    (["vm", "--memory", "abc", "--", "true"], 2, "not a size"),
    (["status", "--port", "\u0668\u0660\u0668\u0660"], 2, "ASCII digits"),   # Arabic-Indic 8080
    (["load", "--port", "80", "--conns", "1_000"], 2, "ASCII digits"),
    (["load", "--host", "999.1.1.1", "--port", "80"], 1, "not an IP address"),
    (["run", "--backlog", "99999999999"], 1, "--backlog must be at most 2147483647"),
    (["run", "--duration", "inf"], 1, "positive number of seconds, not inf"),
    (["run", "--duration", "nan"], 1, "positive number of seconds, not nan"),
    (["run", "--host", "999.1.1.1"], 1, "takes an IP address to bind"),
    (["run", "--load", "10", "--watch"], 1, "use one of the two"),
    (["load", "--proto", "udp", "--port", "9", "--requests-per-conn", "5"], 1, "are HTTP's"),
    (["watch", "--port", "80", "--interval", "inf"], 1, "at most 3600 seconds, not inf"),
    (["watch", "--port", "80", "--duration", "inf"], 1, "finite number of seconds, not inf"),
]


@pytest.mark.parametrize("args,code,words", REFUSED, ids=lambda x: " ".join(x)
                         if isinstance(x, list) else None)
def test_refused_with_one_sentence(cli, args, code, words):
    p = cli(*args, timeout=60)
    assert p.returncode == code, p.stderr
    assert words in p.stderr and "Traceback" not in p.stderr


def test_load_that_never_succeeds_exits_non_zero(netns, cli):
    p = cli("load", "--port", 9, "--conns", 5, "--json")
    assert p.returncode == 1 and "not one connection" in p.stderr, p.stderr
    assert json.loads(p.stdout)["errors"]["refused"] == 5      # the numbers still printed


def test_vm_as_non_root_says_run_as_root(monkeypatch):
    from click.testing import CliRunner

    from reuseport_ctl.cli import main
    from reuseport_ctl.cmd import vm
    monkeypatch.setattr(vm.os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(main, ["vm", "--", "true"])
    assert r.exit_code == 1 and "vm needs root" in r.output, r.output


@pytest.mark.parametrize("after", [0.1, 0.2, 0.4])
def test_ctrl_c_during_start_up_is_one_line_and_130(cli, after):
    import shutil
    import signal
    import time
    exe = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable))
    p = subprocess.Popen([exe, "doctor", "--json"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(after)     # ours take longer (before ~50 ms the interpreter itself is starting)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=30)[1]
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted"), err


def test_doctor_without_capabilities_prints_no_library_noise(cli):
    import shutil
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("capsh (libcap2-bin) is not installed")
    exe = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable))
    p = subprocess.run([capsh, "--drop=all", "--", "-c", f"{exe} doctor --json"],
                       capture_output=True, text=True, timeout=120)
    assert "Failed to load program" not in p.stderr, p.stderr
    assert json.loads(p.stdout)["facilities"], p.stdout[:200]


def test_run_binds_a_bracketed_ipv6_address_as_attach_accepts_it(netns, cli):
    p = cli("run", "--host", "[::1]", "--workers", 2, "--load", 20, "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["host"] == "::1" and rep["total"] == 20


def test_ebpf_prints_every_program_with_its_cflags(netns, cli):
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 8090))
    s.listen(8)
    try:
        p = cli("--ebpf", "attach", "--port", 8090, "--policy", "round-robin", "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["policy"] == "round-robin"     # it still attaches
        shown = p.stderr.split("/* reuseport-ctl --ebpf: cflags ")
        assert len(shown) == 2 and "-DMAX_SLOTS=" in shown[1]
        assert "bpf_sk_select_reuseport" in shown[1]               # the C itself
    finally:
        cli("detach", "--port", 8090)
        s.close()


@pytest.mark.parametrize("args,words", [
    (["load", "--port", "9", "--concurrency", "99999999999"], "--concurrency must be at most"),
    (["load", "--port", "9", "--duration", "inf"], "--duration must be a number of seconds"),
    (["load", "--port", "9", "--timeout", "nan"], "--timeout must be a number of seconds"),
    (["load", "--port", "0"], "--port must be at least 1"),
    (["udp-lookup", "--seconds", "nan"], "--seconds must be a number of seconds"),
    (["remap", "--flows", "0"], "--flows must be at least 1"),
    (["nic", "--port", "70000"], "--port must be at most 65535"),
])
def test_numeric_options_carry_their_range(cli, args, words):
    p = cli(*args, timeout=60)
    assert p.returncode == 1 and words in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
