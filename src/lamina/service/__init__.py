"""containerd's snapshots API: the gRPC server of `lamina serve` and a Python client.

`lamina.service.server` serves a Lamina snapshotter as
`containerd.services.snapshots.v1.Snapshots` on a unix socket, so that
containerd can load it as a proxy snapshotter plugin. `lamina.service.client`
is a `Snapshotter` that calls such a server.
"""
