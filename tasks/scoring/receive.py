"""`cxr receive`: a DICOM C-STORE receiver (pynetdicom) for a PACS that only pushes.

Each received image is written atomically into `paths.incoming` as <SOPInstanceUID>.dcm, where
the nightly job finds it. An instance whose SOP class is not an image is refused with status
0xA900 (dataset does not match SOP class). Binds to loopback unless told otherwise.
"""

from __future__ import annotations

import logging
import re
import threading
from io import BytesIO
from pathlib import Path

from cxr.core.atomic import atomic_write_bytes

log = logging.getLogger("cxr.receive")

REFUSED_NOT_IMAGE = 0xA900


def _is_image(sop_class: str, ds) -> bool:
    from tasks.scoring.dicomweb import IMAGE_SOP_CLASSES

    return sop_class in IMAGE_SOP_CLASSES or (sop_class.startswith("1.2.840.10008.5.1.4.1.1.") and "PixelData" in ds)


def handle_store(incoming: Path):
    incoming = Path(incoming)

    def handler(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        sop_class = str(ds.SOPClassUID)
        if not _is_image(sop_class, ds):
            log.warning("refused an instance of non-image SOP class %s", sop_class)
            return REFUSED_NOT_IMAGE
        name = re.sub(r"[^0-9.]", "_", str(ds.SOPInstanceUID)) + ".dcm"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        atomic_write_bytes(incoming / name, buf.getvalue())
        log.info("received %s", name)
        return 0x0000

    return handler


def make_receiver(incoming: Path, *, host: str = "127.0.0.1", port: int = 11112, ae_title: str = "CXR",
                  block: bool = False):
    """Start the C-STORE SCP; with block=False returns the pynetdicom server (call .shutdown())."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import Verification
    from pynetdicom.presentation import AllStoragePresentationContexts

    Path(incoming).mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_STORE, handle_store(Path(incoming)))]
    return ae.start_server((host, port), block=block, evt_handlers=handlers)


def serve_receiver(incoming: Path, *, host: str = "127.0.0.1", port: int = 11112, ae_title: str = "CXR") -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM end it quietly); a port it cannot bind is a DataError."""
    import signal

    from cxr.core.errors import DataError

    try:
        server = make_receiver(incoming, host=host, port=port, ae_title=ae_title, block=False)
    except OSError as exc:
        raise DataError(f"cannot listen for C-STORE on {host}:{port} ({exc.strerror or exc}); "
                        "choose another --port or stop what holds it") from None
    print(f"receiving C-STORE as {ae_title} on {host}:{port} into {incoming}", flush=True)
    stop = threading.Event()
    # Both signals set the event: a process started with SIGINT ignored (under nohup, or by a
    # supervisor that ignores it) gets no KeyboardInterrupt, and Ctrl-C must still stop it.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown()
    print("receiver stopped", flush=True)
