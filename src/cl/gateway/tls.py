"""The fleet's TLS: gateways speak to each other only with certificates both ways, each signed by
the fleet's own certificate authority (`fleet_ca`), and nothing older than TLS 1.3.

A host's certificate names it (`host`) as a DNS subjectAltName: a gateway forwarding to an
account's home checks that the certificate it is shown names that home.
"""

from __future__ import annotations

import ssl

from cl.config import Config


def contexts(config: Config) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The server's context (a client certificate required) and the client's. Raises OSError
    (ssl.SSLError is one) naming what is wrong with the files."""
    cert, key, ca = config.fleet_cert, config.fleet_key, config.fleet_ca
    assert cert is not None, "load_config checks all three"
    assert key is not None
    assert ca is not None
    made = []
    for purpose in (ssl.Purpose.CLIENT_AUTH, ssl.Purpose.SERVER_AUTH):
        try:  # the fleet's CA only: never the system's
            context = ssl.create_default_context(purpose, cafile=str(ca))
            context.load_cert_chain(cert, key)
        except (OSError, ValueError) as exc:
            raise OSError(f"fleet TLS files (fleet_cert, fleet_key, fleet_ca) unusable: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        made.append(context)
    return made[0], made[1]
