"""The local Telegram: an MTProto 2.0 server that Telethon connects to as to a data centre.

Modules, one role each: ``transport`` (TCP framings), ``crypto`` (AES-IGE, RSA, message
keys), ``handshake`` (auth key creation), ``envelope`` (encrypted message layer),
``store`` (SQLite), ``world`` (accounts, messages, pts), ``faults`` (fault board),
``rpc`` (Telegram methods), ``server`` (TCP connections), ``admin_api`` (HTTP),
``admin_client`` (its client), ``cli`` (``tgfleet sandbox``).
"""
