"""The wheel is the program: built from the checkout and installed outside it, it holds every
data file the code reads. From that install the precheck passes a real radiograph and refuses a
photo, `cxr backbones` answers, and the app serves its templates and static files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, STUDIES, registered_copy

pytestmark = pytest.mark.slow

CHECK = r'''
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from skimage import data

site = Path(sys.argv[1])
import app, cxr, flows, models, tasks
for package in (app, cxr, flows, models, tasks):
    assert Path(package.__file__).resolve().is_relative_to(site), (package.__name__, package.__file__)

from tasks.images.loader import load_image
from tasks.scoring.precheck import REFERENCE_FILE, precheck
facts = {}
radiograph = precheck(load_image(sys.argv[2], facts=facts), facts)
Image.fromarray(data.astronaut()).save("photo.png")
facts = {}
photo = precheck(load_image("photo.png", facts=facts), facts)

from fastapi.testclient import TestClient
from app.main import create_app
from cxr.core.config import load_params
with TestClient(create_app(load_params(sys.argv[3])), base_url="http://127.0.0.1:8000") as client:
    css, page = client.get("/static/app.css"), client.get("/")
print(json.dumps({"reference": str(REFERENCE_FILE), "radiograph": radiograph, "photo": photo,
                  "css": [css.status_code, css.headers.get("content-type"), len(css.content)],
                  "page": [page.status_code, "<form" in page.text]}))
'''


def test_wheel_installed_outside_the_checkout_is_the_program(trained, tmp_path):
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, cwd=tmp_path, capture_output=True)
    wheel = next(wheels.glob("cxr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "tasks/scoring/ood_reference.json" in names
    assert {"app/templates/upload.html", "app/templates/study.html", "app/static/app.css", "app/static/study.js"} <= names
    for package in ("cxr/core", "tasks/images", "tasks/metadata", "tasks/bundle", "tasks/training",
                    "tasks/scoring", "tasks/evaluation", "app/routers"):
        assert f"{package}/__init__.py" in names, package
    # setuptools builds through the checkout's build/lib, which keeps modules since moved or
    # deleted: a wheel holding one would import code the checkout no longer has.
    stale = sorted(n for n in names if not n.split("/")[0].endswith(".dist-info") and not (ROOT / n).is_file())
    assert not stale, f"the wheel holds files the checkout does not (stale build/? remove it): {stale}"

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path, capture_output=True)
    params = registered_copy(trained, "models-wheel")
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(json.loads(params.model_dump_json())))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # ahead of the checkout's editable install
    work = tmp_path / "elsewhere"
    work.mkdir()
    backbones = subprocess.run([sys.executable, "-c", "import sys; from cxr.cli import main; sys.exit(main(['backbones']))"],
                               cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert backbones.returncode == 0, backbones.stderr
    assert {b["name"] for b in json.loads(backbones.stdout)} >= {"resnet18", "resnet50", "densenet121", "efficientnet_lite0"}
    run = subprocess.run([sys.executable, "-c", CHECK, str(site), str(STUDIES / "00000001_000.png"), str(params_file)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(out["reference"]).is_relative_to(site)
    assert out["radiograph"] is None
    assert out["photo"] and out["photo"].startswith("out of distribution: a colour picture")
    assert out["css"][0] == 200 and out["css"][1].startswith("text/css") and out["css"][2] > 0
    assert out["page"] == [200, True]
