"""The golden-value check across machines (first-contact item 20): bitwise where this CPU's fingerprint has a
recording, a tight relative tolerance elsewhere, and the fingerprints named when it fails."""
import pytest

from cpu_fingerprint import RTOL, check_golden, cpu_fingerprint, fingerprint_key

VALUES = {1: 1.3735624551773071, 2: 1.3581966161727905, 3: 1.396465539932251}
OTHER_CPU = {"torch": "x", "capability": "AVX2", "machine": "x86_64", "vendor": "GenuineIntel",
             "model": "another CPU", "cache": "1 KB", "isa": ["avx2"]}


def recording(cpu: dict, values: dict) -> dict:
    return {fingerprint_key(cpu): {"cpu": cpu, "values": values}}


def one_ulp_up(values: dict) -> dict:
    import numpy as np
    return {s: float(np.nextafter(np.float32(v), np.float32(2))) for s, v in values.items()}


def test_fingerprint_names_the_numerics():
    fp = cpu_fingerprint()
    assert set(fp) == {"torch", "capability", "machine", "vendor", "model", "cache", "isa"}
    assert fingerprint_key(fp) == fingerprint_key(dict(fp)) and len(fingerprint_key(fp)) == 12


def test_this_cpus_recording_is_bitwise():
    check_golden(VALUES, recording(cpu_fingerprint(), VALUES), VALUES, "x")
    with pytest.raises(AssertionError, match=r"differ bitwise from the recording of this CPU \(fingerprint "
                                             + fingerprint_key(cpu_fingerprint())):
        check_golden(one_ulp_up(VALUES), recording(cpu_fingerprint(), VALUES), VALUES, "x")


def test_another_cpus_recording_is_checked_to_a_tolerance():
    check_golden(one_ulp_up(VALUES), recording(OTHER_CPU, VALUES), VALUES, "x")
    off = {s: v * (1 + 5 * RTOL) for s, v in VALUES.items()}
    with pytest.raises(AssertionError) as err:
        check_golden(off, recording(OTHER_CPU, VALUES), VALUES, "golden losses")
    text = str(err.value)
    assert "golden losses" in text and fingerprint_key(cpu_fingerprint()) in text and "another CPU" in text


def test_a_missing_step_is_named():
    with pytest.raises(AssertionError, match=r"steps \[3\]"):
        check_golden({1: 1.0, 2: 1.0}, recording(OTHER_CPU, VALUES), VALUES, "x")
