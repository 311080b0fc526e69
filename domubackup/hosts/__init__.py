"""The host adapters: the command runners (local via sh, remote via paramiko), libvirt, the
journal, the lock, the catalog, metrics, logs, the safepath helpers, the probes (facts)."""
