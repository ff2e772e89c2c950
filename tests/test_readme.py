"""The README's commands, checked as far as they can run here: each ``make`` target exists;
``python -m pipelines`` and ``hrnet`` command lines parse, their ``-p`` parameters are the
pipeline's, and the quick start's compile runs (with the registry its ``export`` lines set,
which the compiled images must then name); what ``kubectl apply`` is pointed at exists and
kustomize builds it. Not run here: anything that needs the cluster (``kubectl`` against an
API server, ``kfp run create``, ``submit``'s request: tests/test_pipeline_submit.py sends
one to a stand-in), ``aws`` and ``tensorboard``. The demo itself: tests/test_pipeline_local.py."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import yaml
from helpers import tool

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# First words of README commands that need what is not here, and why each is not run.
NOT_RUN = {"aws": "an S3 store of the user's", "tensorboard": "a browser", "kfp": "a KFP server"}


def commands(text: str):
    """Each command of the ```bash blocks: continuation lines joined, comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line


def test_the_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and [link for link in links if not (ROOT / link).exists()] == []
    # Every document in docs/ is linked from the README.
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md")) == sorted(
        {Path(link).name for link in links if link.startswith("docs/")})


def test_every_readme_command_is_one_this_checkout_runs(tmp_path, monkeypatch):
    from hrnet import cli
    from pipelines import __main__ as pipelines_cli

    makefile = (ROOT / "Makefile").read_text()
    compiled = []
    seen = set()
    for line in commands(README.read_text()):
        words = shlex.split(line)
        seen.add(words[0])
        if words[0] == "make":
            targets = [w for w in words[1:] if "=" not in w]
            assert all(re.search(r"^%s:" % re.escape(t), makefile, re.M) for t in targets), line
        elif words[0] == "export":
            for pair in words[1:]:
                key, _, value = pair.partition("=")
                monkeypatch.setenv(key, value)
        elif words[:3] == ["python", "-m", "pipelines"]:
            args = pipelines_cli.build_parser().parse_args(words[3:])
            if args.command == "compile":
                out = tmp_path / Path(args.output).name
                assert pipelines_cli.main(words[3:words.index("-o")] + ["-o", str(out)]) == 0, line
                compiled.append((out, args.target))
            if args.command == "submit":
                pipelines_cli.parse_arguments(args.param or [], args.target)  # UsageError for an unknown one
        elif words[0] == "hrnet":
            cli.build_parser(words[1]).parse_args(words[2:])
        elif words[:2] == ["kubectl", "apply"]:
            flag, path = words[2], ROOT / words[3]
            assert flag in ("-f", "-k") and path.exists(), line
            if flag == "-k":
                done = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True,
                                      timeout=120)
                assert done.returncode == 0, done.stderr
        elif words[0] not in ("kubectl",):  # kubectl create secret: needs a cluster
            assert words[0] in NOT_RUN, "a README command nothing checks: " + line
    assert {"make", "python", "kubectl", "export"} <= seen and compiled
    # The images the quick start's compile names are the ones its `make images` pushed.
    registry, tag = os.environ["HRNET_IMAGE_REGISTRY"], os.environ["HRNET_IMAGE_TAG"]
    for path, target in compiled:
        spec = next(yaml.safe_load_all(path.read_text()))
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert images == {"%s/hrnet-%s:%s" % (registry, target, tag)}, images
