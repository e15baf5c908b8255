"""varpd: the per-node daemon that tells the overlay driver where to send frames.

What it owns
------------
The overlay design splits one question in two. The driver (`varpd.shim`, our model of the
illumos kernel overlay driver) knows *how* to put a frame on the wire (VXLAN) and keeps a
per-device target cache; varpd knows *where* a destination lives, by asking a search plugin.
varpd owns: the instances (one per overlay device), the plugins (`direct`, `files`, `svp`),
the lookup worker pool, the ARP/NDP/DHCP proxies, the per-VNIC firewall, the state files,
the control socket and its `varpdadm` command line, and a Prometheus endpoint.

::

    varpdadm --(Unix socket, protocol.control msgpack frames)--> control.py --+
                                                                              v
    config.py (TOML) --> daemon.Varpd: instances {name -> Instance}, admin API, lock
                              |            |  persist.py: <state_dir>/<name>.varpd
                              |            v
                              |        instance.Instance --(PluginHost)--> plugins/{direct,
                              |            ^                                files, svp}
                              |            | plugin.lookup(req, reply)          |
          lookup workers (N) -+-- req = await driver.next_lookup()              | arp()/dhcp()
                              |   reply: respond | drop | proxy_{arp,ndp,dhcp} -+-> proxy.py
                              v                                                  inject/resend
                     shim.OverlayDriver (respond, drop, inject, resend, cache_*, associate)

Modules
-------
- `config`: the TOML file and its validation (every error names its key).
- `daemon`: `Varpd(config, driver=None, underlay=None)`; ``await varpd.run(task_status=...)``;
  the admin methods (create, set_props, activate, delete, cache_*, vnic_*, list, show) that
  the control socket calls and that lab (the demo, benchmarks) and tests call directly.
- `instance`: `Instance` lifecycle and properties; `VarpdError(code, message, field)`.
- `persist`: msgpack state files, atomic writes, corrupt files moved aside.
- `control` / `adm`: the control socket server and the ``varpdadm`` client.
- `proxy`: proxy ARP / NDP / DHCP over `protocol.ethernet`'s frame helpers.
- `metrics`: one `CollectorRegistry` per daemon, served on /metrics by the shared
  `httpmetrics` responder (the one portolan uses too).
- `plugins`: `base` (the plugin contract: PropSpec, PluginHost, LookupReply, Plugin),
  `direct`, `files`, `svp` (imported lazily; the daemon runs without it).
- `cli`: ``varpd run --config FILE`` prints ``READY control=PATH metrics=HOST:PORT``.
- `shim`: the model of the kernel overlay driver and its memory/udp backends (own docstring).
- `firewall`: per-VNIC enforcement (`FirewallTable`, `VnicFirewall`) and the `PolicyFetcher`.

Instances (spec §3.2)
---------------------
One instance per overlay device, id 1..INT32_MAX (re-used across restarts). Create = the
device in the driver (vnetid, mtu, ``vxlan/...`` props, VNICs) + an instance bound to a
plugin that must exist. Properties whose name starts with ``<search>/`` belong to the plugin
(validated by its `PropSpec`s; ``search`` is a read-only pseudo-property), the others to the
device. Activate = plugin ``start`` → persist → associate (POINT: the plugin's default point)
→ activate the device; a failure at any step undoes the earlier ones. Destroy = cancel the
instance's in-flight lookups → plugin ``stop`` → remove VNICs, disassociate, delete the device
→ delete the state file. Property changes after activation: device properties are refused (as
the kernel refuses them); plugin properties declared ``live`` are applied (plugin ``update``,
POINT re-association) and persisted — illumos silently dropped such changes (quirk 9.7);
other plugin properties are refused with "cannot be changed while active".

The upcall loop
---------------
``lookup_workers`` tasks (default 2 × CPUs + 1) each loop on ``await driver.next_lookup()``.
The request is matched to its instance by varpd id (unknown or inactive → DROP). The plugin's
``lookup(req, reply)`` runs inside a cancel scope with a deadline (``lookup_timeout``): it
gives exactly one outcome — respond(point), drop, or a proxy — and if it returns without one,
raises, or times out, the worker drops the request. Every request is counted by plugin and
result and timed. The pool bounds how many lookups are in flight; the data path never waits for
varpd (misses queue in the driver, which bounds them).

Persistence
-----------
One file per *activated* instance (``<name>.varpd``: msgpack with a SHA-256 of the payload),
written by temp file + fsync + rename; rewritten after live property changes and VNIC changes;
deleted on destroy; kept on shutdown. At start every file is restored before the control socket
is served: an undecodable file is renamed ``<file>.corrupt`` (reason logged); a decodable one
whose plugin is gone or whose id/name collides is moved aside too; one whose plugin refuses to
start (e.g. an invalid files/config) is kept, its instance restored as created and degraded
with the reason, so that fixing it and ``varpdadm activate`` brings it back. Config devices not
restored are then created and activated (the state file wins over the config for a device that
exists in both: the config is the seed, varpdadm changes are authoritative). The in-process
"kernel" restarts empty, so a record carries its device too, and target caches start empty.

The firewall
------------
When ``portolan_api`` (and ``cn_uuid``) is set, a `varpd.firewall.PolicyFetcher` long-polls
``GET {portolan_api}/firewalls/cns/{cn_uuid}/policy`` in the daemon's nursery and hands every
new document to ``Varpd.firewall`` (a `varpd.firewall.FirewallTable`), which compiles it and
swaps it in whole; a refetch after a reconnect replaces everything. Every VNIC the daemon adds
is bound to the table, so its shim ``Vnic.filter`` is its compiled `VnicFirewall` while the
policy names its MAC and ``None`` otherwise. A background task expires idle flows every 10 s.
The filter runs synchronously in the shim's frame path; nothing in it awaits.

Control socket
--------------
A Unix socket (``control_socket``), 4-byte big-endian length + msgpack map per frame
(`protocol.control`), one handler task per connection, ops listed in `varpd.control`. Errors
carry ``{code, message, field}``; ``field`` names the property or argument at fault. Admin
operations are serialized by one lock and validate every input before changing anything.

Invariants
----------
- A plugin is never called before ``start`` returned or after ``stop`` began.
- Every lookup request taken from the driver gets exactly one respond-or-drop.
- A state file exists iff its instance is active (or was restored but could not start).
- Nothing runs outside the daemon's nursery; shutdown is a cancel (plugins get a short
  shielded grace period for ``stop``).

What may block
--------------
Only awaits: ``next_lookup``, plugin lookups (svp waits on the network), the driver's
``activate``/``delete_device``, and state/file I/O, which runs in ``trio.to_thread`` behind a
capacity limiter. Driver calls (respond, drop, inject, resend, cache_*) are synchronous and
never block. No threads otherwise; no global Prometheus registry.

Where to change what
--------------------
A new control op: `control.OPS` + a `Varpd` method + `adm`. A new plugin: subclass
`plugins.base.Plugin` and add it to `plugins._LAZY`. Frame formats: `protocol.ethernet`.
"""
