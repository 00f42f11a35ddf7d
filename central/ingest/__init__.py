"""Central ingest as a pipeline (issue 11): admission → batch (staging, segment log) → archive.

``batch`` applies received messages inside the writer's transaction and stages segment bytes in the
journal (``staging``); ``archive`` assembles complete transfers in workers and posts one short write
back; ``pipeline`` runs them concurrently over MQTT. ``Ingestor`` runs the same stages one after the
other on one connection: what the tests and tools that feed messages by hand use.
"""

from central.ingest.admission import max_ciphertext_size
from central.ingest.batch import Reply
from central.ingest.inline import Ingestor

__all__ = ["Ingestor", "Reply", "max_ciphertext_size"]
