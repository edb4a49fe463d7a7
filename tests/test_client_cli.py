"""`privface client ...` against the scripted gateway: JSON results on stdout, one-line errors, exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import cv2

from privface.cli import main as privface_main
from client.cli import main
from tests.client_gateway import gateway  # noqa: F401  (module fixture)
from tests.client_gateway import API_KEY, GatewayScript, ScriptedGateway
from tests.test_client_detect import FACES


@pytest.fixture
def env(gateway: ScriptedGateway, monkeypatch: pytest.MonkeyPatch) -> GatewayScript:
    gateway.script.reset()
    monkeypatch.setenv("PRIVFACE_URL", gateway.url)
    monkeypatch.setenv("PRIVFACE_API_KEY", API_KEY)
    return gateway.script


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict], str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got {err!r}"
    return lines[0]


def test_create_subject_with_flags(gateway: ScriptedGateway, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gateway.script.reset()
    monkeypatch.delenv("PRIVFACE_URL", raising=False)
    monkeypatch.delenv("PRIVFACE_API_KEY", raising=False)
    status, out, _ = run(["--url", gateway.url, "create-subject", "--api-key", API_KEY, "--external-id", "c-1"], capsys)
    assert status == 0 and out[0]["id"] == "sub_1" and out[0]["external_id"] == "c-1"


def test_enroll_several_photos(env: GatewayScript, capsys: pytest.CaptureFixture[str]) -> None:
    photos = [str(FACES / "James_Caan_0001.jpg"), str(FACES / "James_Caan_0002.jpg")]
    status, out, err = run(["enroll", "sub_1", *photos], capsys)
    assert status == 0 and [e["subject_id"] for e in out] == ["sub_1", "sub_1"]
    assert "enroll" in err and "2/2" in err, "a progress bar for several photos"
    assert [r[1] for r in env.requests].count("/v1/subjects/sub_1/enrollments") == 2


def test_verify_identify_delete(env: GatewayScript, capsys: pytest.CaptureFixture[str]) -> None:
    photo = str(FACES / "Bill_Maher_0001.jpg")
    env.match_subject = "sub_1"
    assert run(["verify", "sub_1", photo], capsys)[:2] == (0, [{"match": True}])
    assert run(["identify", photo], capsys)[:2] == (0, [{"match": True, "subject_id": "sub_1"}])
    env.match_subject = None
    assert run(["identify", photo], capsys)[:2] == (0, [{"match": False, "subject_id": None}])
    assert run(["delete", "sub_1"], capsys)[:2] == (0, [{"deleted": "sub_1"}])


def test_through_the_privface_command(env: GatewayScript, capsys: pytest.CaptureFixture[str]) -> None:
    assert privface_main(["client", "delete", "sub_1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": "sub_1"}


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["verify", "sub_1"], ["enroll", "sub_1", "x.jpg",
                                                                            "--face-policy", "all"]])
def test_usage_errors(env: GatewayScript, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, out, err = run(argv, capsys)
    assert status == 2 and out == []
    error_line(err)
    assert env.requests == []


def test_missing_credentials(env: GatewayScript, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRIVFACE_API_KEY")
    status, _, err = run(["delete", "sub_1"], capsys)
    assert status == 2 and "PRIVFACE_API_KEY" in error_line(err)


def test_input_errors(env: GatewayScript, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    status, _, err = run(["verify", "sub_1", str(missing)], capsys)
    assert status == 2 and str(missing) in error_line(err)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg")
    status, _, err = run(["identify", str(garbage)], capsys)
    assert status == 2 and "could not be decoded" in error_line(err)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 200, np.uint8))
    status, _, err = run(["verify", "sub_1", str(blank)], capsys)
    assert status == 2 and "no face" in error_line(err)


def test_several_faces_name_the_cli_flag_and_leave_no_output_file(env: GatewayScript,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    two = tmp_path / "two.jpg"
    photos = [cv2.imread(str(FACES / name)) for name in ("James_Caan_0001.jpg", "Mary_Jo_Myers_0001.jpg")]
    cv2.imwrite(str(two), np.concatenate(photos, axis=1))
    out = tmp_path / "two.features.json"
    status, _, err = run(["features", str(two), "-o", str(out)], capsys)
    line = error_line(err)
    assert status == 2 and "2 faces" in line and "--face-policy largest" in line and "face_policy=" not in line
    assert not out.exists() and list(tmp_path.iterdir()) == [two], "nothing written on failure"
    status, printed, err = run(["features", str(two), "-o", str(out), "--face-policy", "largest"], capsys)
    assert status == 0 and printed == [] and err == ""
    assert json.loads(out.read_text())["shape"] == list(env.spec.shape)


def test_an_undecodable_photo_is_one_line_exit_2(env: GatewayScript, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"GIF89a not really")
    status, _, err = run(["features", str(garbage), "-o", str(tmp_path / "out.json")], capsys)
    assert status == 2 and error_line(err) == f"error: {garbage}: the photo could not be decoded as an image"
    assert not (tmp_path / "out.json").exists()


def test_a_bad_photo_stops_enrollment_before_any_upload(env: GatewayScript, capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    two = tmp_path / "two.png"
    pair = [cv2.imread(str(FACES / name)) for name in ("James_Caan_0001.jpg", "Bill_Maher_0001.jpg")]
    cv2.imwrite(str(two), np.concatenate(pair, axis=1))
    status, out, err = run(["enroll", "sub_1", str(FACES / "James_Caan_0002.jpg"), str(two)], capsys)
    assert status == 2 and out == []
    assert "2 faces" in err.splitlines()[-1] and err.splitlines()[-1].startswith("error: ")
    assert "/v1/subjects/sub_1/enrollments" not in [r[1] for r in env.requests]
    status, out, _ = run(["enroll", "sub_1", str(two), "--face-policy", "largest"], capsys)
    assert status == 0 and len(out) == 1


def test_service_errors_exit_1(env: GatewayScript, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(["--api-key", "wrong", "delete", "sub_1"], capsys)
    assert status == 1 and "Missing or invalid API key" in error_line(err)
    env.reset()
    env.status_override = 404
    status, _, err = run(["delete", "sub_1"], capsys)
    assert status == 1 and error_line(err) == "error: Scripted error: status 404"


def test_enrollments_done_before_a_failure_are_reported(env: GatewayScript, capsys: pytest.CaptureFixture[str]) -> None:
    photos = [str(FACES / "James_Caan_0001.jpg"), str(FACES / "James_Caan_0002.jpg")]
    env.fail_after = 2  # /v1/transforms and the first enrollment succeed, then the gateway refuses
    status, out, err = run(["enroll", "sub_1", *photos], capsys)
    assert status == 1 and len(out) == 1 and out[0]["subject_id"] == "sub_1"
    assert err.splitlines()[-1] == "error: Scripted error: status 422"


def test_unexpected_errors_are_one_line_too(env: GatewayScript, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRIVFACE_YUNET_PATH", str(tmp_path / "no-model.onnx"))
    status, _, err = run(["verify", "sub_1", str(FACES / "Bill_Maher_0001.jpg")], capsys)
    assert status == 1 and "YuNet model not found" in error_line(err)


def test_max_epsilon_flag(env: GatewayScript, capsys: pytest.CaptureFixture[str]) -> None:
    too_small = env.spec.epsilon_per_image / 2
    status, out, err = run(["verify", "sub_1", str(FACES / "Bill_Maher_0001.jpg"), "--max-epsilon", str(too_small)],
                           capsys)
    assert status == 1 and out == [] and "allows at most" in error_line(err)
    assert [r[1] for r in env.requests] == ["/v1/transforms"]
