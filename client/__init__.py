"""privface client SDK: on-device detection, alignment and noised frequency features, plus the REST client.

    from client import PrivfaceClient
    with PrivfaceClient("https://privface.example", api_key) as pf:
        subject = pf.create_subject()
        pf.enroll(subject["id"], "me.jpg")
        pf.verify(subject["id"], "me_again.jpg")  # -> bool

Only noised, float16 block-DCT features leave the device (client.features); the photo never does.
"""
from client.errors import (AuthenticationError, ConflictError, InvalidFeaturesError, InvalidPhotoError,
                           InvalidRequestError, MultipleFacesError, NoFaceError, NotFoundError, PermissionDeniedError,
                           PrivacyBudgetError, PrivfaceError, ServiceUnavailableError)
from client.features import FeaturePayload
from client.sdk import PrivfaceClient

__all__ = ["PrivfaceClient", "FeaturePayload", "PrivfaceError", "NoFaceError", "MultipleFacesError",
           "AuthenticationError", "PermissionDeniedError", "NotFoundError", "ConflictError", "InvalidRequestError",
           "ServiceUnavailableError", "PrivacyBudgetError", "InvalidPhotoError", "InvalidFeaturesError"]
