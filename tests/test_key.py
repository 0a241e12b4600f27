import base64

import pytest

from tsnet.key import DiscoPrivate, DiscoPublic, MachinePrivate, MachinePublic, NodePrivate, NodePublic, clamp


@pytest.mark.parametrize(
    "priv_cls, pub_cls, prefix",
    [(NodePrivate, NodePublic, "nodekey:"), (MachinePrivate, MachinePublic, "mkey:"), (DiscoPrivate, DiscoPublic, "discokey:")],
)
def test_text_forms_round_trip(priv_cls, pub_cls, prefix):
    priv = priv_cls.generate()
    pub = priv.public
    assert isinstance(pub, pub_cls)
    text = str(pub)
    assert text.startswith(prefix) and len(text) == len(prefix) + 64 and text == text.lower()
    assert pub_cls.parse(text) == pub
    assert pub_cls.parse(prefix + text[len(prefix):].upper()) == pub  # either case on input
    assert str(priv).startswith("privkey:")
    assert priv_cls.parse(str(priv)).public == pub
    assert pub_cls.from_base64(pub.to_base64()) == pub
    assert pub_cls.from_raw(pub.raw) == pub


def test_private_repr_hides_secret():
    priv = NodePrivate.generate()
    assert priv.hex() not in repr(priv)


def test_known_x25519_vector():
    # RFC 7748 section 6.1
    alice = NodePrivate(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    bob_pub = NodePublic(bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"))
    assert alice.public.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert alice.exchange(bob_pub).hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def test_generated_keys_are_clamped():
    raw = NodePrivate.generate().raw
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
    assert clamp(b"\xff" * 32)[0] == 0xF8 and clamp(b"\xff" * 32)[31] == 0x7F


def test_types_do_not_compare_equal_across_roles():
    raw = NodePrivate.generate().public.raw
    assert NodePublic(raw) != MachinePublic(raw)
    assert len({NodePublic(raw), NodePublic(raw), DiscoPublic(raw)}) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("mkey:" + "00" * 32, "expected prefix 'nodekey:'"),
        ("nodekey:" + "00" * 31, "expected 64 hex digits"),
        ("nodekey:" + "zz" * 32, "hex digits only"),
        ("", "expected prefix"),
    ],
)
def test_malformed_text_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        NodePublic.parse(text)


def test_malformed_raw_and_base64():
    with pytest.raises(ValueError, match="expected 32 raw bytes, got 31"):
        NodePublic(b"\0" * 31)
    with pytest.raises(ValueError, match="not valid base64"):
        NodePublic.from_base64("not base64!!")
    with pytest.raises(ValueError, match="decodes to 3 bytes"):
        NodePublic.from_base64(base64.b64encode(b"abc").decode())
    with pytest.raises(ValueError):
        NodePublic.parse(123)  # type: ignore[arg-type]


def test_zero_key():
    assert NodePublic.zero().is_zero()
    assert str(NodePublic.zero()) == "nodekey:" + "0" * 64
    assert not NodePrivate.generate().public.is_zero()


def test_exchange_rejects_low_order_point():
    with pytest.raises(ValueError):
        NodePrivate.generate().exchange(NodePublic.zero())
