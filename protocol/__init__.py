"""protocol: every byte format Portolan speaks, as sans-I/O codecs.

What it owns
------------
Everything that crosses a process or a wire between the parts of the system is defined here,
and only here: portolan and varpd never share a Python object, only these formats.

==================  =========================================================================
module              format
==================  =========================================================================
``svp``             SVP v1/v2, the lookup protocol between varpd and portolan (TCP 1296):
                    frozen message dataclasses, ``encode()``, an incremental ``Decoder``
``svp_scapy``       a scapy layer for SVP bound to TCP 1296, for dissecting captures
``vxlan``           the 8-byte VXLAN header, the inner-flow hash behind the outer source port
``ethernet``        Ethernet/802.1Q headers; ARP, IPv6 NS/NA and DHCP frames the proxies read
                    and write
``control``         varpd's control socket: length-prefixed msgpack requests and replies
``fwrule``          the SmartDataCenter firewall rule language: lexer, parser, checks,
                    canonical text, rule objects
``fwpolicy``        the compiled per-compute-node firewall policy portolan hands to varpd
``addr``            MAC and IP text/wire helpers shared by all of the above
==================  =========================================================================

Theory of operation
-------------------
The h11 model: bytes go in, typed values come out, and values go back to bytes. A codec never
opens a socket, never sleeps and never imports trio, so every rule of every protocol is
tested with plain bytes in microseconds, and the daemons are thin loops around these modules.
Incremental decoders (``svp.Decoder``, ``control.Decoder``) accept data in any split and hand
out whole messages; they hold at most one frame's worth of bytes beyond what the caller has
consumed, and refuse a declared size over their limit as soon as the header is in.

Invariants
----------
- A decoder raises only its protocol's error type (``svp.ProtocolError`` and subclasses,
  ``control.ControlProtocolError``, ``fwrule.FwruleError``, ``vxlan.VxlanError``,
  ``ethernet.FrameError``); input from the network can never surface as ``struct.error``,
  ``IndexError`` or the like. After an SVP or control decoding error the stream is poisoned:
  the caller closes the connection, because a byte stream cannot be resynchronised.
- On the wire every IP is 16 bytes (IPv4 as ``::ffff:a.b.c.d``) and every MAC 6 bytes; text
  forms are produced by ``addr`` only.
- Encoding is byte-exact with the illumos/SmartOS implementations (SVP, VXLAN) and with
  sdc-fwrule (canonical rule text); the worked examples of the specs are tests.

Where to change what
--------------------
A new SVP op: its dataclass, body struct and entry in ``MESSAGE_TYPES`` in ``svp``, then the
scapy layer. A new control-socket operation needs nothing here (ops are strings); its
arguments are validated by varpd. A change to the firewall policy document bumps its
``version`` field in ``fwpolicy``.
"""
