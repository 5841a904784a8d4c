"""Step 9, update: trust metadata and release verification (``trust``), the update agent that
verifies, downloads, stages and swaps (``agent``), the trial that commits or rolls back
(``trial``) and the state it keeps across reboots (``state``)."""
