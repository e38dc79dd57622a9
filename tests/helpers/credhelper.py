"""A docker credential helper the tests write: ``docker-credential-NAME`` in a directory the test
puts on PATH, speaking the docker-credential-helpers protocol (``get``: server URL on stdin,
``{"ServerURL", "Username", "Secret"}`` on stdout) from a table the test controls.

    helper = CredHelper(tmp_path / "bin", "pytest", {"127.0.0.1:5000": ("alice", "s3cret")})
    monkeypatch.setenv("PATH", helper.path_env())     # or env=dict(os.environ, PATH=helper.path_env())
    ... helper.calls()                                 # [{"argv": ["get"], "stdin": "127.0.0.1:5000"}, ...]

Table values: ``(username, secret)`` (username ``"<token>"``: the secret is an identity token),
``"fail"`` (exit 3 with a message on stderr), ``"garbage"`` (exit 0, not JSON), ``"leaky-fail"``
(exit 1 printing the would-be answer JSON, secret included, as a sloppy helper might). A server
URL not in the table gets docker's "credentials not found in native keychain" and exit 1.
The table is re-read on every call (`set`).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_SCRIPT = r'''#!{python}
import json, sys
url = sys.stdin.read()
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin": url}}) + "\n")
if sys.argv[1:] != ["get"]:
    print("unsupported action", file=sys.stderr)
    sys.exit(2)
with open({table!r}) as f:
    e = json.load(f).get(url)
if e is None:
    print("credentials not found in native keychain")
    sys.exit(1)
if e == "fail":
    print("the keychain is locked", file=sys.stderr)
    sys.exit(3)
if e == "garbage":
    print("this is not json")
    sys.exit(0)
answer = json.dumps({{"ServerURL": url, "Username": e[0], "Secret": e[1]}})
if e[2:] == ["leaky-fail"]:
    print(answer)
    sys.exit(1)
print(answer)
'''


class CredHelper:
    def __init__(self, bin_dir: str | os.PathLike, name: str, table: dict):
        self.bin_dir = Path(bin_dir)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = self.bin_dir / f"{name}.calls"
        self.table_path = self.bin_dir / f"{name}.table.json"
        self.set(table)
        self.program = self.bin_dir / f"docker-credential-{name}"
        self.program.write_text(_SCRIPT.format(python=sys.executable, log=str(self.log),
                                               table=str(self.table_path)))
        self.program.chmod(0o755)

    def set(self, table: dict) -> None:
        self.table_path.write_text(json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in table.items()}))

    def path_env(self, path: str | None = None) -> str:
        """PATH with the helper's directory first."""
        rest = os.environ.get("PATH", "") if path is None else path
        return f"{self.bin_dir}{os.pathsep}{rest}" if rest else str(self.bin_dir)

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


def write_config(config_dir: str | os.PathLike, cfg: dict) -> Path:
    """``config_dir/config.json`` with exactly ``cfg`` (auths, credsStore, credHelpers, ...)."""
    d = Path(config_dir)
    d.mkdir(parents=True, exist_ok=True)
    p = d / "config.json"
    p.write_text(json.dumps(cfg))
    return p
