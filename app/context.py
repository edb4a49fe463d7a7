"""Everything a gateway worker holds for its lifetime, built once in the app's lifespan."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.services.abuse import AbuseControls
from app.services.identify_batcher import IdentifyBatcher
from app.services.jobs import JobRunner
from app.services.model_registry import ServedModels
from app.services.replay import ReplayGuard
from app.settings import GatewaySettings
from secure.coordinator import PartyPair


@dataclass
class GatewayContext:
    settings: GatewaySettings
    engine: Engine
    sessions: sessionmaker[Session]
    models: ServedModels
    parties: PartyPair
    replay: ReplayGuard
    abuse: AbuseControls
    jobs: JobRunner
    identify_batcher: IdentifyBatcher
