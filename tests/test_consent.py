"""Consent to monitoring: an opted-out patient's data is not collected at all."""

import asyncio
import time
from pathlib import Path

import pytest

from gateway import vault
from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.keys import init_keys

pytestmark = pytest.mark.broker


def test_opted_out_patients_recordings_are_neither_replayed_nor_labelled(
    tmp_path: Path, broker: LocalBroker
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{state}"\n[mqtt]\nport = {broker.port}\n'
    )
    cfg = load_config(config)
    init_keys(cfg.path(cfg.security.key_dir))
    ada = vault.add_patient(cfg, "MRN-1", "Ada Lovelace").ref
    bob = vault.add_patient(cfg, "MRN-2", "Bob Example").ref
    vault.set_consent(cfg, bob, monitoring=False)
    config.write_text(
        config.read_text()
        + "".join(
            f'[[patients]]\nref = "{ref}"\n'
            f'[[replay]]\nsource = "mitdb"\nfile = "data:mitdb/{rec}_all.csv"\n'
            f'device = "strap-{rec}"\npatient = "{ref}"\n'
            for ref, rec in ((ada, "100"), (bob, "123"))
        )
    )
    cfg = load_config(config)
    start = time.time() - 3600

    async def scenario() -> tuple[set, set]:
        agent = Agent(cfg, clock=ManualClock(start))
        await agent.start(live_ticks=False)
        try:
            assert agent.unmonitored() == {bob}
            await agent.replay(start=start, speed=None)
            stored = {r.patient_ref for r in agent.store.readings()}
            labelled = {ref for ref in (ada, bob) if agent.store.labels(ref)}
        finally:
            await agent.stop()
        return stored, labelled

    stored, labelled = asyncio.run(scenario())
    assert stored == {ada}
    assert labelled == {ada}
