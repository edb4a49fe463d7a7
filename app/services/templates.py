"""Features → embedding → protected template → fixed point. The plaintext lives only in this call."""
from __future__ import annotations

import numpy as np

from app.auth import Principal, tenant_template_key
from app.services.model_registry import LoadedModel
from inference.protect import protect_embedding
from secure.fixedpoint import encode


def gallery_name(model_version: str, tenant_id: str, key_version: int) -> str:
    """The parties' gallery a template belongs to: one per model version, tenant and key version.

    Keeping tenants and key versions apart means a query can only ever match its own tenant's current
    templates: revoking a key (bumping its version) leaves the old templates in a gallery nobody searches.
    """
    return f"{model_version}/{tenant_id}/k{key_version}"


async def protected_template(model: LoadedModel, features: np.ndarray, principal: Principal,
                             master_secret: str) -> np.ndarray:
    """The fixed-point protected template of `features` under the caller's tenant key (int64 [d])."""
    embedding = await model.embed(features)
    key = tenant_template_key(master_secret, principal.tenant_id, principal.tenant_key_version)
    template = protect_embedding(embedding, key, model.version, principal.tenant_key_version)
    return encode(template)
