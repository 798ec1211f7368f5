"""The network: one asyncio loop in a thread (loop), the libp2p daemon and DHT node
(network), the bounded DHT storage kept for others (dht_storage), and bundle transfers
over libp2p streams (transfer)."""
