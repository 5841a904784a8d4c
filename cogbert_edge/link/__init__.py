"""The MQTT 5 mutual-TLS link every device and service uses (``mqtt``), and a device's own key and
certificate signing request (``identity``)."""
