"""The contract both sides share: a site parses the coordinator's message with the same RunConfig, the
settings' command-line options come from its fields, and files are replaced atomically."""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import fields

import pytest

from common.atomic_files import atomic_write, atomic_write_bytes, atomic_write_text
from contract.run_config import SERVER_ONLY_SETTINGS, RunConfig, flower_key
from contract.site_task import SiteTask, site_task_record
from models.errors import NeurofedError
from study.run_options import SHORT_NAMES, add_run_config_options, given_settings


def test_a_site_reads_back_every_setting_the_coordinator_sends() -> None:
    config = RunConfig(local_steps=7, spacing_mm=3.0, field_of_view_mm="96,96,96", dp=False, seed=11)
    task = SiteTask.from_record(site_task_record(config, server_round=4, run_id="run-x"))
    assert (task.server_round, task.run_id) == (4, "run-x")
    for f in fields(RunConfig):
        if flower_key(f.name) not in SERVER_ONLY_SETTINGS:
            assert getattr(task.run, f.name) == getattr(config, f.name), f.name
    # FedProx's weight is the strategy's to send; without it the site adds no proximal term.
    assert task.proximal_mu == 0.0 and config.proximal_mu > 0
    assert SiteTask.from_record({**site_task_record(config, 1), "proximal-mu": 0.5}).proximal_mu == 0.5


def test_a_message_without_a_setting_names_it_and_the_version_mismatch() -> None:
    record = site_task_record(RunConfig(), server_round=1)
    del record["patch-size"]
    with pytest.raises(NeurofedError, match=r"patch-size.*different neurofed versions"):
        SiteTask.from_record(record)


def test_a_site_validates_the_field_of_view_it_is_sent() -> None:
    record = {**site_task_record(RunConfig(), server_round=1), "field-of-view-mm": "96,oops"}
    with pytest.raises(NeurofedError, match="field-of-view-mm"):
        SiteTask.from_record(record)


def test_simulate_offers_every_run_setting_by_its_key_and_its_short_name() -> None:
    parser = argparse.ArgumentParser()
    add_run_config_options(parser, exclude=("data_root", "run_dir"))
    assert given_settings(parser.parse_args([])) == {}
    args = parser.parse_args(["--sites", "3", "--local-steps", "5", "--no-dp", "--dp-delta", "1e-6"])
    assert given_settings(args) == {"num_sites": 3, "local_steps": 5, "dp": False, "dp_delta": 1e-6}
    for f in fields(RunConfig):
        if f.name in ("data_root", "run_dir"):
            continue
        flag = SHORT_NAMES.get(f.name, f"--{flower_key(f.name)}")
        value = getattr(RunConfig(), f.name)
        argv = [f"--{'no-' if value else ''}{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
        assert given_settings(parser.parse_args(argv)) == {f.name: (not value if isinstance(value, bool) else value)}
    with pytest.raises(SystemExit):
        parser.parse_args(["--strategy", "fedmagic"])


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_key_is_created_with_its_final_mode(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "site.key", b"secret", mode=0o600)
        atomic_write_text(tmp_path / "site.pub", "public")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "site.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "site.pub").stat().st_mode) == 0o644
    assert (tmp_path / "site.key").read_bytes() == b"secret"


def test_the_coordinator_leaves_out_a_site_of_another_contract_version_naming_both(task_identity) -> None:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY
    from server.site_discovery import compatible_replies

    def reply(node: int, site_id: str, version: int | None) -> Message:
        query = Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
        query.metadata.__dict__["_message_id"] = query.object_id
        info = {"site-id": site_id, "role": "train"}
        if version is not None:
            info[CONTRACT_VERSION_KEY] = version
        answer = Message(RecordDict({"site": ConfigRecord(info)}), reply_to=query)
        answer.metadata.__dict__["_src_node_id"] = node
        return answer

    replies = [reply(1, "same", CONTRACT_VERSION), reply(2, "newer", CONTRACT_VERSION + 1), reply(3, "old", None)]
    kept, left_out = compatible_replies(replies, lambda node: f"node {node}")
    assert [r.metadata.src_node_id for r in kept] == [1]
    assert [e["site"] for e in left_out] == ["newer", "old"]
    assert f"contract version {CONTRACT_VERSION}, site newer's installed neurofed version {CONTRACT_VERSION + 1}" in (
        left_out[0]["reason"]
    )
    assert "version none" in left_out[1]["reason"]


def test_a_resumed_run_may_change_rounds_and_sites_only() -> None:
    from contract.resume_settings import decode_resume_settings, encode_resume_settings, resumed_config

    stored = RunConfig(num_rounds=5, num_sites=3, unseen_sites=1, min_sites=2, strategy="fedprox")
    changes = {"num-server-rounds": 8, "num-sites": 2, "min-sites": 1}
    wanted = RunConfig.from_flower({**stored.to_flower(), **decode_resume_settings(encode_resume_settings(changes))})
    resumed = resumed_config(stored, wanted.replace(run_dir="runs/x"))
    assert (resumed.num_rounds, resumed.num_sites, resumed.min_sites) == (8, 2, 1)
    assert resumed.strategy == "fedprox" and resumed.run_dir == "runs/x"
    with pytest.raises(NeurofedError, match=r"\['strategy'\] cannot be changed.*min-sites"):
        encode_resume_settings({"strategy": "fedavg", "min-sites": 1})
    assert encode_resume_settings({}) == "" and decode_resume_settings("") == {}
