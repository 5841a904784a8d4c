"""Steps 2 and 3 on the device: the experience log that turns decisions and delayed rewards into
records (``log``), the durable, bounded outbox (``outbox``) and the uploader that sends batches
and deletes them only after the cloud's acknowledgement (``uploader``)."""
