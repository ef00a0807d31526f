"""Every code block of README.md runs as written, as a newcomer would run it in a fresh clone.

Blocks are read from the README itself, so an example that stops working fails here. A marker in
an HTML comment on the line before a block says how it runs:

- none: run it (bash with `set -e`, python with the interpreter) in one scratch directory shared by
  all blocks, in order, with a fresh model cache;
- `<!-- readme-test: setup -->`: the install commands; `.ci/run` runs them (installing here would
  replace the machine's environment), so only what follows `pip install … &&` runs, and never the
  test suite itself;
- `<!-- readme-test: server -->`: a server command; it is started in the background on a free
  loopback port (in place of the README's 8000) until the `client` blocks after it have run;
- `<!-- readme-test: client -->`: run against that server;
- `<!-- readme-test: gpu -->`: run only where ONNX Runtime offers CUDA.

`ortdiffusion` resolves to this checkout's command line (a shim on PATH), whatever is installed.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_COMMANDS = (
    """pip install -e '.[cpu]' && ortdiffusion generate "a red circle on the left" -o out.png""",
    "pip install -e '.[dev]' && python -m pytest",
)

pytestmark = pytest.mark.readme


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    marker: str | None
    line: int

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.language}{', ' + self.marker if self.marker else ''})"


def readme_blocks(text: str) -> list[Block]:
    blocks, marker = [], None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.fullmatch(r"<!--\s*readme-test:\s*(\w+)\s*-->", line.strip())
        if m:
            marker = m.group(1)
        elif line.startswith("```") and line.strip() != "```":
            language, start = line[3:].strip(), i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(language, "\n".join(lines[start:end]) + "\n", marker, start))
            marker, i = None, end
        elif line.strip():
            marker = None  # a marker applies to the block right after it
        i += 1
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        shims = workdir.parent / "bin"
        shims.mkdir(exist_ok=True)
        shim = shims / "ortdiffusion"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ortdiffusion.cli "$@"\n')
        shim.chmod(0o755)
        (shims / "python").symlink_to(sys.executable)
        self.env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    "ORTDIFFUSION_CACHE": str(workdir.parent / "cache")}
        self.port: int | None = None
        self.log: list[str] = []

    def run(self, block: Block, code: str | None = None) -> subprocess.CompletedProcess:
        code = code if code is not None else block.code
        if self.port is not None:
            code = code.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        if block.language in ("bash", "sh", "shell"):
            cmd = ["bash", "-e", "-c", code]
        elif block.language == "python":
            cmd = [sys.executable, "-c", code]
        else:
            pytest.fail(f"{block.name}: a code block in a language this test cannot run; mark it or use bash/python")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=600)
        self.log.append(f"--- {block.name}, {time.perf_counter() - start:.1f} s, exit {proc.returncode}\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        assert proc.returncode == 0, self.log[-1]
        assert "Traceback" not in proc.stderr, self.log[-1]
        return proc

    def start_server(self, block: Block) -> subprocess.Popen:
        (command,) = [line for line in block.code.splitlines() if line.strip() and not line.startswith("#")]
        self.port = free_port()
        command = command.split("#")[0].replace("--port 8000", f"--port {self.port} --host 127.0.0.1")
        server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.workdir, env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"{block.name}: the server exited with {server.returncode}:\n{server.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return server
            except OSError:
                time.sleep(0.3)
        server.terminate()
        pytest.fail(f"{block.name}: the server was not ready within 120 s")


def setup_code(block: Block) -> str:
    """The setup block without its installs (.ci/run does them) and without the suite (this is it)."""
    lines = []
    for line in block.code.splitlines():
        command = line.split("#")[0].strip()
        command = re.sub(r"^pip install [^&]*&&\s*", "", command)
        if command and not re.fullmatch(r"python3? -m pytest.*", command):
            lines.append(command)
    return "\n".join(lines) + "\n"


def test_the_readme_opens_with_the_two_setup_commands():
    (setup,) = [b for b in readme_blocks(README.read_text()) if b.marker == "setup"]
    commands = [line.split("#")[0].strip() for line in setup.code.splitlines()]
    assert commands == list(SETUP_COMMANDS)
    assert setup.line < 12  # first thing a reader sees


def test_ci_runs_the_readme_commands_and_this_test():
    ci = (ROOT / ".ci" / "run").read_text()
    for command in SETUP_COMMANDS:
        install, _, rest = command.partition(" && ")
        assert install in ci and rest.split()[-1] in ci, command
    assert "readme" not in ci.split("pytest")[1].split("\n")[0]  # not deselected


def test_every_readme_code_block_runs_as_written(tmp_path):
    import onnxruntime as ort

    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 8
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    workdir = tmp_path / "clone"
    workdir.mkdir()
    runner = Runner(workdir)
    server = None
    try:
        for block in blocks:
            if block.marker == "gpu" and not gpu:
                continue
            if block.marker == "setup":
                runner.run(block, setup_code(block))
            elif block.marker == "server":
                server = runner.start_server(block)
            elif block.marker == "client":
                assert server is not None, f"{block.name}: a client block before any server block"
                out = runner.run(block).stdout
                assert '"error"' not in out, runner.log[-1]  # an error body through a pipe exits 0
            else:
                if server is not None:  # the clients are done: the service is not needed any longer
                    server.terminate()
                    server.wait(30)
                    server, runner.port = None, None
                runner.run(block)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        print("\n".join(runner.log))
    made = {p.name for p in workdir.iterdir()}
    assert {"out.png", "square.png", "circles-0.webp", "circle.png", "report.json", "side-by-side.png",
            "tiny-bundle", "lighthouse.png"} <= made, made
