"""CPU: segments cut K at group and cluster boundaries, padded to whole tiles."""

from qtool.kernels import make_segments


def test_segments_cut_at_groups_and_clusters():
    s = make_segments(300, 128, [0, 100, 300], "u8")
    assert s.bounds == (0, 100, 128, 256, 300)
    assert s.group_of == (0, 0, 1, 2) and s.cluster_of == (0, 1, 1, 1)
    assert s.ptile == (0, 4, 5, 9, 11) and s.ntiles == 12  # padded to 32-code tiles, 4-tile aligned
    assert int(s.positions()[100]) == 128
