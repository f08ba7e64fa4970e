"""Security properties (issue 6, item 8): nothing from disk is unpickled, API keys never reach
disk or logs, and model output is parsed only in sandboxed worker processes."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, distill_cmd
from distill.testing.fault_server import FaultPlan, FaultServer

# --------------------------------------------------------------------------- (a) no unpickling

_FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pandas.read_pickle",
    "shelve.open", "marshal.load", "marshal.loads", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
    "yaml.full_load_all", "numpy.lib.format.read_array",
}
_NO_IMPORT = {"cloudpickle", "dill", "joblib", "shelve"}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _qualname(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load" given `import numpy as np`; None for calls on expressions."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str) -> list[str]:
    """"file:line: what" for every call in `source` that can unpickle data: torch.load without
    weights_only=True, pickle/dill/cloudpickle/joblib/marshal/shelve loads, np.load with
    allow_pickle=True, yaml.load with an unsafe or no Loader; and imports of pickling libraries."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in _NO_IMPORT:
                    problems.append(f"{filename}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in _NO_IMPORT:
                problems.append(f"{filename}:{node.lineno}: imports from {node.module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualname(node.func, aliases)
        where = f"{filename}:{node.lineno}"
        if name is None:
            continue
        if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            problems.append(f"{where}: torch.load without weights_only=True")
        elif name in _FORBIDDEN:
            problems.append(f"{where}: {name} can execute code from the data it reads")
        elif name == "numpy.load" and _kw(node, "allow_pickle") is not None and \
                not (isinstance(_kw(node, "allow_pickle"), ast.Constant) and _kw(node, "allow_pickle").value is False):
            problems.append(f"{where}: numpy.load with allow_pickle")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            lname = _qualname(loader, aliases) if loader is not None else None
            if lname is None or lname.rsplit(".", 1)[-1] not in _SAFE_YAML_LOADERS:
                problems.append(f"{where}: {name} without a safe Loader")
    return problems


def test_the_checker_flags_every_unsafe_form_and_passes_safe_ones():
    bad = textwrap.dedent("""
        import pickle, torch, yaml
        import numpy as np
        import cloudpickle
        from pickle import loads as L
        from torch import load
        pickle.load(f)
        L(b)
        torch.load(p)
        torch.load(p, weights_only=False)
        load(p)
        np.load(p, allow_pickle=True)
        yaml.load(s)
        yaml.load(s, Loader=yaml.Loader)
        yaml.unsafe_load(s)
    """)
    lines = [int(p.split(":")[1]) for p in unsafe_loads(bad, "bad.py")]
    # Every line from `import cloudpickle` (line 4) onwards, except the from-imports, is flagged.
    assert sorted(lines) == [4, 7, 8, 9, 10, 11, 12, 13, 14, 15], unsafe_loads(bad, "bad.py")
    good = textwrap.dedent("""
        import torch, yaml, json
        import numpy as np
        torch.load(p, map_location="cpu", weights_only=True)
        np.load(p)
        np.load(p, allow_pickle=False)
        yaml.safe_load(s)
        yaml.load(s, Loader=yaml.SafeLoader)
        json.loads(s)
        model.load(p)
    """)
    assert unsafe_loads(good, "good.py") == []


def test_no_module_of_the_package_unpickles_disk_data():
    problems = []
    for path in sorted((REPO / "distill").rglob("*.py")):
        problems += unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
    assert problems == [], "\n".join(problems)


# --------------------------------------------------------------------------- (b) the API key


def _leaks(root: Path, secret: str) -> tuple[list[str], int]:
    """Files under `root` that contain `secret` (Parquet read as values: its pages may be
    compressed), and how many files were scanned."""
    found, scanned = [], 0
    needle = secret.encode()
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        scanned += 1
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if needle in data:
            found.append(str(path))
        elif path.suffix == ".parquet" and secret in json.dumps(pq.read_table(path).to_pylist(), default=str):
            found.append(str(path))
    return found, scanned


@pytest.mark.slow
def test_the_api_key_reaches_no_file_log_or_output(tmp_path, gsm8k_train):
    secret = "sk-distill-" + os.urandom(12).hex()
    wrong = "sk-wrong-" + os.urandom(12).hex()
    with open(gsm8k_train) as f:
        rows = [json.loads(next(f)) for _ in range(6)]
    rows.append({"id": "long-1", "problem": "TOO_LONG " * 20, "answer": "1"})  # a 400, with its reason
    source = tmp_path / "seeds.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Ray's session files (logs of the driver, raylet, GCS and every worker) go here, not to the
    # machine's shared /tmp/ray: short, because Ray's socket paths must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dsec-", dir="/tmp"))
    outputs = []
    try:
        for name, key, server_key in (("run", secret, secret), ("run-wrong", wrong, secret)):
            with FaultServer(api_key=server_key, faults=FaultPlan.uniform(0.3, seed=4)) as server:
                cfg = {
                    "run": {"dir": str(tmp_path / name), "progress": False},
                    "ray": {"num_cpus": 2},
                    "source": {"path": str(source)},
                    "generate": {"engine": "openai", "n_samples": 2, "shard_size": 4, "replicas": 1,
                                 "cpus_per_replica": 0.5, "sampling": {"max_new_tokens": 30, "seed": 1},
                                 "openai": {"base_url": server.base_url, "model": "teacher",
                                            "api_key_env": "DISTILL_SECRET_TEST_KEY", "backoff_base_s": 0.01,
                                            "backoff_max_s": 0.05, "max_retries": 20, "timeout_s": 5}},
                }
                path = tmp_path / f"{name}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                env = {**os.environ, "DISTILL_SECRET_TEST_KEY": key, "RAY_TMPDIR": str(ray_tmp)}
                env.pop("RAY_ADDRESS", None)
                gen = subprocess.run(distill_cmd("generate", str(path)), capture_output=True, text=True,
                                     timeout=300, env=env)
                assert gen.returncode == 0, gen.stdout + gen.stderr[-4000:]
                rep = subprocess.run(distill_cmd("report", str(tmp_path / name)), capture_output=True, text=True,
                                     timeout=120, env=env)
                assert rep.returncode == 0, rep.stdout + rep.stderr[-4000:]
                outputs += [gen.stdout, gen.stderr, rep.stdout, rep.stderr]
                if name == "run":  # the key was used: every sample but the too-long ones came back
                    assert sum(server.completions.values()) >= 12 and server.faults, server.faults
                else:  # the wrong key was sent and echoed back by the server in each 401
                    assert server.rejections["unauthorized"] == 14, server.rejections

        from distill.store import read_records

        # With the key: all 6 good questions x 2 samples came back; the too-long one is refused.
        assert len(read_records(tmp_path / "run" / "generate")) == 12
        assert {r["id"] for r in read_records(tmp_path / "run" / "generate", rejected=True)} == {"long-1"}
        reasons = {r["reason"] for r in read_records(tmp_path / "run-wrong" / "generate", rejected=True)}
        assert reasons == {"http_401: Incorrect API key provided: ***"}, reasons
        for key in (secret, wrong):
            assert not any(key in text for text in outputs), "the key is in the command output"
            found, scanned = _leaks(tmp_path, key)
            assert found == [] and scanned >= 10, found
            found, scanned_ray = _leaks(ray_tmp, key)
            assert found == [], found
        # The scan covered Ray's logs of this run: driver, raylet and worker logs are there.
        logs = [p.name for p in ray_tmp.rglob("logs/*") if p.is_file()]
        assert any(n.startswith("raylet") for n in logs) and any(n.startswith("worker-") for n in logs), logs
        assert scanned_ray > 20
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------- (c) the sandbox

_SANDBOX_PROBE = """
import json, sys, time
from distill.curate.verify import Verifier, VerifyConfig

pathological = [
    "2^{2^{2^{2^{2^{2^{100}}}}}}",                     # a tower of powers: sympy hangs in one C call
    "(10^{8})!",                                        # a factorial with ~760 million digits
    "\\\\sqrt{" * 150 + "2" + "}" * 150,                # 150 nested roots: 1,051 characters
]
normal = [("\\\\frac{6}{4}", "1.5"), ("\\\\sqrt{9}", "3"), ("x+1", "1+x"), ("4", "5")]
cfg = VerifyConfig(timeout_s=2, workers=2, memory_limit_mb=1024)
with Verifier(cfg) as v:
    v.verify([("\\sqrt{4}", "2")])  # start the workers outside the timing
    t0 = time.monotonic()
    got = v.verify([(p, "5") for p in pathological] + normal)
    elapsed = time.monotonic() - t0
print(json.dumps({"codes": [g.code for g in got], "details": [g.detail for g in got], "elapsed": elapsed,
                  "parsed_here": sorted(m for m in ("sympy", "math_verify", "latex2sympy2_extended")
                                        if m in sys.modules)}))
"""


@pytest.mark.slow
def test_model_output_is_parsed_only_in_limited_workers():
    """Pathological answers cost their worker (killed at the time limit, reported as timeout) or
    are refused unparsed (longer than max_answer_chars), and nothing else; the calling process
    never imports a parser of model output."""
    proc = subprocess.run([sys.executable, "-c", _SANDBOX_PROBE], capture_output=True, text=True, timeout=180,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    codes = out["codes"]
    # The tower and the factorial run into the 2 s limit; the nested roots are over the default
    # max_answer_chars (1000) and never reach the parser.
    assert codes == ["timeout", "timeout", "parse_error", "equal", "equal", "equal", "not_equal"], out
    assert "longer than max_answer_chars=1000" in out["details"][2], out
    # Two limits (plus the 1 s kill margin each), even if one worker gets both of them.
    assert out["elapsed"] < 2 * (2 + 1) + 6, out
    assert out["parsed_here"] == [], out
