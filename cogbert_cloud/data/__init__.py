"""Step 4, ingest, and the data it leaves: the ingestion service (``ingest``), object stores
(``store``: a directory or S3), every object key (``keys``) and the experience dataset the
trainers and the gate read (``dataset``)."""
