//! The alignment example's construction on the CPU (`examples/alignment.rs`,
//! included as a module): each target token's largest weight, in the head
//! mean and in every head, is on its true source token; the alignment is
//! neither the identity nor monotone across chunks (so the check says
//! something); and the PNG it writes decodes to the expected size with the
//! marks where the alignment says.

#[allow(dead_code)]
#[path = "../examples/alignment.rs"]
mod example;

#[test]
fn the_maps_recover_the_known_alignment() {
    let c = example::construction();
    let r = example::cpu_maps(&c).unwrap();
    let (lq, lk) = (c.ql.seq(), c.kl.seq());
    assert_ne!(lq, lk);
    assert!(c.alignment.windows(2).any(|w| w[1] < w[0]), "chunks reordered: not monotone overall");
    assert!(c.alignment.windows(2).any(|w| w[1] == w[0]), "a chunk stretched: not diagonal");
    assert!(example::misaligned(&c, &r.mean, &r.maps).is_empty());
    // Not by accident: shifting the alignment by one token breaks it.
    let mut shifted = example::construction();
    shifted.alignment.iter_mut().for_each(|a| *a = (*a + 1) % lk);
    assert_eq!(example::misaligned(&shifted, &r.mean, &r.maps).len(), (1 + 4) * lq);
    // The sharpest head puts most of each row's weight on the aligned token.
    let sharp = &r.maps[3 * lq * lk..];
    for (i, &a) in c.alignment.iter().enumerate() {
        assert!(sharp[i * lk + a] > 0.5, "row {i}: {}", sharp[i * lk + a]);
    }
}

#[test]
fn the_png_decodes_with_the_right_size() {
    let c = example::construction();
    let r = example::cpu_maps(&c).unwrap();
    let path = std::env::temp_dir().join(format!("fused-attn-alignment-{}.png", std::process::id()));
    example::write_png(&path, &c, &r.mean, &r.maps).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let _ = std::fs::remove_file(&path);
    let (w, h) = example::png_size(c.ql.seq(), c.kl.seq());
    assert_eq!((info.width as usize, info.height as usize), (w, h));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    // The mark of row i sits at the centre of cell (i, a(i)) of the mean panel.
    let px = |x: usize, y: usize| &buf[(y * w + x) * 3..][..3];
    for (i, &a) in c.alignment.iter().enumerate() {
        assert_eq!(px(a * 8 + 4, i * 8 + 4), [0, 220, 255], "row {i}");
        let other = (a + 3) % c.kl.seq();
        assert_ne!(px(other * 8 + 4, i * 8 + 4), [0, 220, 255], "row {i}");
    }
}
