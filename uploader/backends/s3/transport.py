"""How the backend's botocore client reaches the store, as botocore itself resolved it.

The blocking sender (:mod:`.sender`) carries some requests below a botocore client, so
it must connect exactly as that client would, or not at all. botocore settles this when it
creates the client: the certificate authorities (``verify=``, else ``AWS_CA_BUNDLE`` or
``ca_bundle`` in the AWS config, else ``REQUESTS_CA_BUNDLE``, else certifi's bundle), the
client certificate (``Config(client_cert=...)``) and the proxies (``Config(proxies=...)``,
else ``HTTP_PROXY``/``HTTPS_PROXY`` less ``NO_PROXY``), and keeps the results on the
client's HTTP session. They are read from there, not looked up again, and the TLS context
is built with botocore's own helpers, the way its HTTP session builds one.

What the sender does not implement sends the requests through botocore's own stack
instead: a proxy, a scheme other than http/https, or an HTTP session that does not say
what it resolved (a botocore this code does not know).
"""

from __future__ import annotations

import dataclasses
import ssl
import urllib.parse
from typing import Any

__all__ = ["Transport", "tls_context", "transport_of"]

ClientCert = str | tuple[str, str] | None


@dataclasses.dataclass(frozen=True)
class Transport:
    verify: bool | str = True  # False, True (botocore's default bundle) or a CA bundle path
    client_cert: ClientCert = None  # a PEM file, or (certificate file, key file)
    direct: bool = True  # whether the blocking sender may carry this client's requests
    why_not: str = ""  # when not direct: what the sender would have done differently


def transport_of(client: Any) -> Transport:
    """What the botocore (or aiobotocore) ``client`` resolved for its connections."""
    url = str(client.meta.endpoint_url)
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    try:
        verify = session._verify  # type: ignore[union-attr]
        cert_file, key_file = session._cert_file, session._key_file  # type: ignore[union-attr]
        proxies = session._proxy_config  # type: ignore[union-attr]
    except AttributeError:
        return Transport(direct=False, why_not=(
            f"the S3 client's HTTP session ({type(session).__name__}) does not say which "
            "certificates and proxies it uses"))
    cert: ClientCert = (cert_file, key_file) if cert_file and key_file else cert_file
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return Transport(verify, cert, direct=False, why_not=f"the endpoint {url} is not http(s)")
    proxy = proxies.proxy_url_for(url)
    if proxy:
        from botocore.httpsession import mask_proxy_url

        return Transport(verify, cert, direct=False,
                         why_not=f"requests go through the proxy {mask_proxy_url(proxy)}")
    return Transport(verify, cert)


def tls_context(verify: bool | str, client_cert: ClientCert) -> ssl.SSLContext:
    """The TLS context botocore's HTTP session would use: its base context, the CA bundle it
    resolved (certifi's for ``True``), nothing verified for ``False``, the client certificate.
    Host names are checked whenever certificates are (urllib3 does it itself; here the ssl
    module does). Raises ``OSError``/``ssl.SSLError`` for a bundle or certificate that
    cannot be loaded."""
    from botocore.httpsession import create_urllib3_context, get_cert_path

    ctx: ssl.SSLContext = create_urllib3_context()
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        ctx.load_verify_locations(get_cert_path(verify))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if isinstance(client_cert, tuple):
        ctx.load_cert_chain(client_cert[0], client_cert[1])
    elif client_cert:
        ctx.load_cert_chain(client_cert)
    return ctx
