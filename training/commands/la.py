"""`sslsegment import-la SRC DST`: the LA2018 h5 layout → a data-set folder (see SSLSegmentLib/data/la.py)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "import-la",
        help="convert the LA h5 layout (<case>/mri_norm2.h5, train.list) into a data-set folder",
        description="Convert the LA2018 h5 layout into a data-set folder (images, labels/final, dataset.json). "
        "Splits: test = --test-list, else the source's test.list, else the last --test-count cases of train.list "
        "(a development test split); val = --val-list, else the last --val-count of the rest; train = the rest, "
        "in train.list order (its first N are the usual labeled cases).",
    )
    p.add_argument("src", help="folder with <case>/mri_norm2.h5 and train.list")
    p.add_argument("dst", help="data-set folder to write")
    p.add_argument("--half-resolution", action="store_true", help="2×2×2 block average: 1.25 mm instead of 0.625 mm")
    p.add_argument("--zscore", action="store_true", help="re-normalise each volume to mean 0, sd 1 over the stored crop")
    p.add_argument("--val-count", type=int, default=10, help="validation cases carved from train.list (default 10)")
    p.add_argument("--test-count", type=int, default=10, help="development test cases carved from train.list (default 10)")
    p.add_argument("--val-list", default=None, help="file naming the validation cases (one per line)")
    p.add_argument("--test-list", default=None, help="file naming the test cases (one per line)")
    p.add_argument("--train-list", default=None, help="the case order (default SRC/train.list)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier import in DST")
    p.set_defaults(func=cmd_import_la)


def cmd_import_la(args) -> int:
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.data.la import import_la, read_list
    from training.cli import CommandError

    try:
        out = import_la(
            args.src,
            args.dst,
            half_res=args.half_resolution,
            n_val=args.val_count,
            n_test=args.test_count,
            val_ids=read_list(args.val_list) if args.val_list else None,
            test_ids=read_list(args.test_list) if args.test_list else None,
            train_list=args.train_list,
            overwrite=args.overwrite,
            progress=True,
            zscore=args.zscore,
        )
    except (ImportError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    ds = DataSet(out)
    s = ds.splits
    print(f"wrote {len(ds.case_ids)} cases to {out}: train {len(s['train'])}, val {len(s['val'])}, test {len(s['test'])} "
          f"({ds.meta['split_notes']['test']})")
    return 0
