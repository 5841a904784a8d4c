"""The fleet's infrastructure: its PKI (``pki``), the Mosquitto configuration and a local broker
(``broker``), the broker's ACL plugin (``mosquitto_plugin/``) and simulated devices
(``simulate``)."""
