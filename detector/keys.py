"""Ed25519 key files of the signed control plane: create, load, and build signers/verifiers from
:class:`Settings` (see :mod:`detector.core.signing` for what each key may sign).

``detector keys generate --out DIR --name soc`` writes ``DIR/soc.key`` (PKCS#8 PEM, mode 0600,
never overwritten) and ``DIR/soc.pub`` (SubjectPublicKeyInfo PEM).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from detector.config import Settings
from detector.core.capacity import QueueStateSigner, QueueStateVerifier
from detector.core.errors import ConfigError
from detector.core.signing import Signer, Verifier

log = logging.getLogger("detector")


def generate(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Create ``<name>.key`` (0600) and ``<name>.pub`` in ``out_dir``; refuses to overwrite."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (private, public):
        if p.exists():
            raise ConfigError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(private, 0o600)  # whatever the umask
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private(path: Path, var: str) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read {str(path)!r}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{var}: {str(path)!r} is readable by other users (mode "
                          f"{stat.S_IMODE(mode):04o}); chmod 600 it")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{var}: {str(path)!r} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{var}: {str(path)!r} is not an Ed25519 key")
    return key


def load_public(path: Path, var: str) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read {str(path)!r}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{var}: {str(path)!r} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{var}: {str(path)!r} is not an Ed25519 public key")
    return key


def soc_signer(settings: Settings) -> Signer:
    """The SOC tool's signer (``detector lists``); a clear error when no key is configured."""
    if settings.soc_private_key is None:
        raise ConfigError("DETECTOR_SOC_PRIVATE_KEY is not set: list entries must be signed. "
                          "Create a key pair with `detector keys generate --out keys --name soc`, "
                          "give workers keys/soc.pub (DETECTOR_SOC_PUBLIC_KEYS) and this tool "
                          "keys/soc.key")
    return Signer(load_private(settings.soc_private_key, "DETECTOR_SOC_PRIVATE_KEY"))


def worker_signer(settings: Settings) -> Signer | None:
    """The worker's signer for learned entries, or None when no key is configured."""
    if settings.worker_private_key is None:
        return None
    return Signer(load_private(settings.worker_private_key, "DETECTOR_WORKER_PRIVATE_KEY"))


def verifier(settings: Settings, *, soc_signer: Signer | None = None,
             worker_signer: Signer | None = None) -> Verifier:
    """The trusted public keys from settings, plus the public halves of the given signers."""
    soc = [load_public(p, "DETECTOR_SOC_PUBLIC_KEYS") for p in settings.soc_public_keys]
    worker = [load_public(p, "DETECTOR_WORKER_PUBLIC_KEYS") for p in settings.worker_public_keys]
    if soc_signer is not None:
        soc.append(soc_signer.public_key())
    if worker_signer is not None:
        worker.append(worker_signer.public_key())
    return Verifier(soc=soc, worker=worker)


def worker_keys(settings: Settings) -> tuple[Verifier, Signer | None]:
    """What a worker needs: the verifier (its own public key trusted for learned entries) and
    its signer. Says loudly what is missing."""
    signer = worker_signer(settings)
    v = verifier(settings, worker_signer=signer)
    if v.trusted("soc") == 0:
        log.warning("lists: no SOC public key (DETECTOR_SOC_PUBLIC_KEYS): every entry on the "
                    "lists topic is refused; entries come from the policy and lists file only")
    if signer is None:
        log.warning("lists: no worker key (DETECTOR_WORKER_PRIVATE_KEY): learned deny entries "
                    "apply on this worker only and are not published")
    return v, signer


def dialer_signer(settings: Settings) -> QueueStateSigner:
    """The dialer's signer for queue states (``detector queue-state publish``)."""
    if settings.dialer_private_key is None:
        raise ConfigError("DETECTOR_DIALER_PRIVATE_KEY is not set: queue states must be signed. "
                          "Create a key pair with `detector keys generate --out keys --name dialer`, "
                          "give workers keys/dialer.pub (DETECTOR_DIALER_PUBLIC_KEYS) and the "
                          "dialer keys/dialer.key")
    return QueueStateSigner(load_private(settings.dialer_private_key, "DETECTOR_DIALER_PRIVATE_KEY"))


def dialer_verifier(settings: Settings) -> QueueStateVerifier:
    """The dialer keys a worker trusts for queue states; says loudly when there is none (then
    every queue state is refused and capacity protection stays off)."""
    keys = [load_public(p, "DETECTOR_DIALER_PUBLIC_KEYS") for p in settings.dialer_public_keys]
    if not keys:
        log.warning("capacity: no dialer public key (DETECTOR_DIALER_PUBLIC_KEYS): every queue "
                    "state is refused; agent-capacity protection is off")
    return QueueStateVerifier(keys)


def add_command(sub: Any) -> None:
    """``detector keys generate``."""
    k = sub.add_parser("keys", help="Ed25519 keys that sign detector-lists entries and queue states")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    g = ksub.add_parser("generate", help="create NAME.key (0600) and NAME.pub in a directory")
    g.add_argument("--out", type=Path, required=True, help="directory for the key files")
    g.add_argument("--name", required=True, help="soc, dialer, or a worker's name (e.g. worker)")
    g.set_defaults(func=_cmd_generate)


def _cmd_generate(args: Any) -> int:
    if not args.name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--name: expected letters, digits, - and _, got {args.name!r}")
    private, public = generate(args.out, args.name)
    sys.stdout.write(f"wrote {private} (private, mode 0600) and {public} (public)\n")
    return 0
