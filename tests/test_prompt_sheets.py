"""A/B prompt sheets: real .xlsx and .csv files as marketers make them, read, validated and stored."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import replace
from pathlib import Path

import openpyxl
import pyarrow.parquet as pq
import pytest

from catalogs.prompts import STYLES
from catalogs.rules import ModelDefaults, sample_seed
from catalogs.sheets import (
    PROMPT_SHEET_SCHEMA,
    SheetFormatError,
    SheetRules,
    expand_variants,
    load_prompt_sheet,
    read_prompt_sheet,
    variants_from_table,
)
from tasks.planning import ImageCheck, PlanningRules, plan_sheet
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import load_profiles

# What a run with real weights reads sheets with: the default models, any profile name.
FULL = SheetRules(models=ModelDefaults(variant="full", text_model="t2v-a14b", image_model="i2v-a14b"))
SAMPLE_SHEET = Path(__file__).parent.parent / "catalogs" / "sample" / "ab_sheet.csv"

HEADERS = [
    "Experiment ID",
    "Variant ID",
    "Prompt",
    "Template",
    "Subject",
    "Model",
    "Seeds",
    "Samples",
    "Aspect ratio",
    "Size",
    "Image URI",
    "Owner",  # a column of the team's own: ignored with a warning
]
# Spreadsheet row number -> the row's cells, in HEADERS order; row 1 is the header.
XLSX_ROWS: dict[int, list[object]] = {
    # Excel turns a typed 16:9 into the time 16:09; the reader reads it back as the ratio.
    2: [
        "spring",
        "A",
        "A sea-blue mug on a sunny kitchen counter",
        None,
        None,
        None,
        None,
        3,
        dt.time(16, 9),
    ],
    3: ["spring", "B", None, "Studio", "Speckled stoneware mug", "ti2v-5b", "7, 8; 9", None, "9:16"],
    4: [
        "spring",
        "C",
        "The mug turns slowly",
        None,
        None,
        "i2v-a14b",
        42,
        None,
        None,
        "832x480",
        "s3://b/mug.png",
    ],
    # 5 is left empty: skipped, numbering goes on
    6: ["spring", "D", "A mug", None, None, "wan-2.1"],
    7: ["spring", "E", "A mug", None, None, None, None, None, "4:5"],
    8: ["spring", "F", None, None, "Speckled mug"],
    9: ["spring", "a", "A mug, again"],
    10: ["spring", "Hero shot/1", "A mug"],
    11: ["spring", "G", "A mug", None, None, None, "1, two, 3"],
    12: ["spring", "H", "A mug", None, None, None, None, 20],
    13: ["fall", "X", "A scarf in the wind", None, None, None, None, 2, None, None, None, "dana"],
    14: ["fall", "Y", "A scarf", None, None, None, None, None, "1:1"],
    15: ["fall", "Z", "A scarf", None, None, "t2v-a14b", None, None, None, None, "images/scarf.png"],
    16: ["  ", None, " "],  # whitespace only: an empty row
}


def _xlsx_bytes() -> bytes:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "Spring tests"
    sheet.append(HEADERS)
    for row, cells in XLSX_ROWS.items():
        for column, value in enumerate(cells, start=1):
            sheet.cell(row=row, column=column, value=value)
    sheet.cell(row=13, column=len(HEADERS) + 2, value="stray note")  # data under no header
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def xlsx_read():
    return read_prompt_sheet(_xlsx_bytes(), "spring.xlsx", rules=FULL)


def test_xlsx_good_rows_parse(xlsx_read):
    by_id = {(v.experiment_id, v.variant_id): v for v in xlsx_read.variants}
    assert list(by_id) == [("spring", "A"), ("spring", "B"), ("spring", "C"), ("fall", "X")]
    a, b, c, x = by_id.values()
    assert [v.row for v in (a, b, c, x)] == [2, 3, 4, 13]

    assert a.prompt == "A sea-blue mug on a sunny kitchen counter"
    assert (a.model, a.model_variant, a.width, a.height, a.aspect_ratio) == (
        "t2v-a14b",
        "full",
        1280,
        720,
        "16:9",
    )
    assert a.seeds_derived and a.seeds == tuple(sample_seed("spring", i) for i in range(3))

    assert b.template == "studio" and b.subject == "Speckled stoneware mug"
    assert b.prompt == f"Speckled stoneware mug. {STYLES['studio']}"
    assert (b.model, b.width, b.height) == ("ti2v-5b", 704, 1280)
    assert b.seeds == (7, 8, 9) and not b.seeds_derived

    assert (c.model, c.width, c.height, c.image_uri, c.seeds) == (
        "i2v-a14b",
        832,
        480,
        "s3://b/mug.png",
        (42,),
    )
    assert len(x.seeds) == 2


def test_xlsx_bad_rows_name_row_and_column_as_written(xlsx_read):
    problems = [str(p) for p in xlsx_read.problems]
    assert problems == [
        "row 6, column 'Model': 'wan-2.1' is not one of t2v-a14b, i2v-a14b, ti2v-5b "
        "(leave it empty for the default)",
        "row 7, column 'Aspect ratio': '4:5' is not one of 16:9, 9:16, 1:1",
        "row 8, column 'Prompt': is empty; write a prompt, or choose a template "
        "(studio, lifestyle, cinematic, outdoor, flatlay) and a subject",
        "row 9, column 'Variant ID': variant 'a' of experiment 'spring' is already on row 2",
        "row 10, column 'Variant ID': 'Hero shot/1' may hold only letters, digits, '.', '_' and '-', "
        "starting with a letter or digit, e.g. 'Hero-shot-1'",
        "row 11, column 'Seeds': 'two' in '1, two, 3' is not a whole number; write seeds like 1, 2, 3",
        "row 12, column 'Samples': '20' is outside 1 to 16",
        "row 14, column 'Aspect ratio': 1:1: t2v-a14b has no square size; "
        "its sizes are 1280x720, 720x1280, 832x480, 480x832",
        "row 15, column 'Image URI': t2v-a14b is text-to-video and takes no image; leave it empty, "
        "or choose a model that takes one (i2v-a14b, ti2v-5b)",
    ]
    assert [str(w) for w in xlsx_read.warnings] == [
        "column 'Owner': is not a prompt-sheet column, so column L is ignored; the columns are "
        "experiment_id, variant_id, prompt, template, subject, style, negative_prompt, model, seeds, "
        "samples, aspect_ratio, size, image_uri, postprocess_profile, recipe, adapters, notes",
        "column 'N': has no header, so its 1 value(s) are ignored",
    ]


def test_every_problem_of_a_row_is_reported_and_pairs_are_exclusive():
    csv = (
        "experiment_id,variant_id,prompt,template,seeds,samples,aspect_ratio,size,model\n"
        "e1,v1,a prompt,studio,1,2,16:9,1280x720,\n"
        "e1,v2,a prompt,,1 1,,,,ti2v-5b\n"
        "e1,V2,,outdoor,,,9:16,,\n"
    )
    read = read_prompt_sheet(csv.encode(), "s.csv", rules=FULL)
    assert read.variants == []
    assert [(p.at.row, p.field) for p in read.problems] == [
        (2, "template"),  # both prompt and template
        (2, "size"),  # both aspect ratio and size
        (2, "samples"),  # both seeds and samples
        (3, "seeds"),  # a seed twice
        (4, "variant_id"),  # v2 again, in another case: the pair was taken by row 3, though row 3 is bad
        (4, "subject"),  # a template needs a subject
    ]
    assert str(read.problems[3]) == "row 3, column 'seeds': seed 1 is listed twice"


def test_csv_from_excel_with_bom_messy_headers_and_multiline_cells():
    # Excel's "CSV UTF-8": a BOM, CRLF, headers as people type them, a quoted cell spanning two lines.
    csv = (
        "\ufeff Experiment-ID ,VARIANT ID,  Prompt ,Aspect Ratio,seed ,Image\r\n"
        ' launch , hero ,"Slow dolly-in on the lamp,\r\nwarm evening light" , 9:16 ,"3, 1",\r\n'
        "launch,side,  A lamp   on a desk  ,,,images/lamp.png\r\n"
        "launch,bad id,A lamp,,,\r\n"
        ",,,,,\r\n"
        ",,,,,\r\n"
    )
    read = read_prompt_sheet(csv.encode("utf-8"), "launch.csv", rules=FULL)
    hero, side = read.variants
    assert (hero.experiment_id, hero.variant_id, hero.row) == ("launch", "hero", 2)
    assert hero.prompt == "Slow dolly-in on the lamp, warm evening light"
    assert (hero.width, hero.height, hero.seeds) == (720, 1280, (3, 1))
    assert side.prompt == "A lamp on a desk"
    assert (side.model, side.image_uri, side.width, side.height) == ("i2v-a14b", "images/lamp.png", 1280, 720)
    # The spreadsheet row, not the file's line: the quoted newline does not shift it.
    assert [str(p) for p in read.problems] == [
        "row 4, column 'VARIANT ID': 'bad id' may hold only letters, digits, '.', '_' and '-', "
        "starting with a letter or digit, e.g. 'bad-id'"
    ]
    assert read.warnings == []


def test_csv_from_excel_in_a_decimal_comma_locale():
    # Excel's plain "CSV" where ',' is the decimal mark: ';' separators, Windows-1252 text.
    csv = (
        "Experiment ID;Variant ID;Prompt;Samples\r\n"
        "dessert;A;Crème brûlée in a café, the spoon cracks the sugar;2\r\n"
        "café;B;Crème brûlée;2\r\n"
    ).encode("cp1252")
    read = read_prompt_sheet(csv, "fr.csv", rules=FULL)
    (variant,) = read.variants
    assert variant.prompt == "Crème brûlée in a café, the spoon cracks the sugar"
    assert len(variant.seeds) == 2
    assert [str(p) for p in read.problems] == [
        "row 3, column 'Experiment ID': 'café' may hold only letters, digits, '.', '_' and '-', "
        "starting with a letter or digit, e.g. 'cafe'"
    ]


def test_sheet_level_mistakes_raise_with_what_to_change(tmp_path):
    with pytest.raises(SheetFormatError, match="no variant_id column"):
        read_prompt_sheet(b"Experiment ID,Prompt\ne,p\n", "a.csv", rules=FULL)
    with pytest.raises(SheetFormatError, match="neither a prompt nor a template"):
        read_prompt_sheet(b"Experiment ID,Variant\ne,v\n", "a.csv", rules=FULL)
    with pytest.raises(SheetFormatError, match=r"'Seeds' \(C\) and 'seed' \(D\) are both seeds"):
        read_prompt_sheet(b"experiment_id,variant_id,Seeds,seed,prompt\n", "a.csv", rules=FULL)
    with pytest.raises(SheetFormatError, match="row 1 must hold the column headers"):
        read_prompt_sheet(b"\n\nexperiment_id,variant_id,prompt\n", "a.csv", rules=FULL)
    with pytest.raises(SheetFormatError, match=r"\.xlsx workbook or a \.csv file"):
        read_prompt_sheet(b"whatever", "a.ods", rules=FULL)
    with pytest.raises(SheetFormatError, match="could not be read as an Excel workbook"):
        read_prompt_sheet(b"not a zip", "a.xlsx", rules=FULL)


def test_workbook_sheet_choice_profiles_and_tiny_sizes():
    workbook = openpyxl.Workbook()
    workbook.active.title = "How to fill this in"
    sheet = workbook.create_sheet("Variants")
    sheet.append(["experiment_id", "variant_id", "prompt", "postprocess_profile", "aspect_ratio"])
    sheet.append(["e", "web", "p", "web-hero", "1:1"])
    sheet.append(["e", "social", "p", "reels", "9:16"])
    buffer = io.BytesIO()
    workbook.save(buffer)
    tiny_web = SheetRules(
        models=replace(FULL.models, variant="tiny"), postprocess_profiles=frozenset({"web-hero"})
    )
    read = read_prompt_sheet(buffer.getvalue(), "e.xlsx", sheet="Variants", rules=tiny_web)
    (web,) = read.variants
    assert (web.postprocess_profile, web.model_variant, web.width, web.height) == ("web-hero", "tiny", 64, 64)
    assert [str(p) for p in read.problems] == [
        "row 3, column 'postprocess_profile': 'reels' is not one of the profiles: web-hero"
    ]
    with pytest.raises(SheetFormatError, match="Worksheet named 'Nope' not found"):
        read_prompt_sheet(buffer.getvalue(), "e.xlsx", sheet="Nope", rules=FULL)


def test_parquet_round_trip_keeps_schema_and_variants(xlsx_read, tmp_path):
    assert xlsx_read.table.schema.equals(PROMPT_SHEET_SCHEMA, check_metadata=True)
    assert xlsx_read.table.num_rows == len(xlsx_read.variants)
    path = tmp_path / "variants.parquet"
    pq.write_table(xlsx_read.table, path)
    back = pq.read_table(path)
    assert back.schema.equals(PROMPT_SHEET_SCHEMA, check_metadata=True)
    assert variants_from_table(back) == xlsx_read.variants


def test_seeds_and_clips_are_deterministic(xlsx_read):
    again = read_prompt_sheet(_xlsx_bytes(), "spring.xlsx", rules=FULL)
    clips = expand_variants(xlsx_read.variants)
    assert clips == expand_variants(again.variants)
    assert [(c.variant.variant_id, c.sample, c.seed) for c in clips] == [
        ("A", 0, sample_seed("spring", 0)),
        ("A", 1, sample_seed("spring", 1)),
        ("A", 2, sample_seed("spring", 2)),
        ("B", 0, 7),
        ("B", 1, 8),
        ("B", 2, 9),
        ("C", 0, 42),
        ("X", 0, sample_seed("fall", 0)),
        ("X", 1, sample_seed("fall", 1)),
    ]
    # Pinned: a changed derivation would silently re-roll every published experiment.
    assert sample_seed("spring", 0) == 1015252953
    assert sample_seed("spring", 0) != sample_seed("fall", 0)


def test_paired_variants_share_seeds_and_every_clip_is_a_valid_request():
    read = load_prompt_sheet(str(SAMPLE_SHEET), rules=FULL)
    assert (read.problems, read.warnings) == ([], [])
    by_id = {v.variant_id: v for v in read.variants}
    assert len(by_id) == 6
    # Derived seeds are the experiment's: variants A and B of one experiment start from the same noise.
    assert by_id["A-studio"].seeds == by_id["B-morning"].seeds == by_id["C-from-photo"].seeds
    image = by_id["C-from-photo"].image_uri
    assert image is not None and Path(image).is_file()  # resolved against the sheet's folder
    digests = {image: ImageCheck(sha256=hashlib.sha256(Path(image).read_bytes()).hexdigest())}
    for variant_model in ("full", "tiny"):
        # Through the planner the A/B flow uses: each clip's request passes the model's rules and its profile.
        models = replace(FULL.models, variant=variant_model)
        rules = PlanningRules(
            models=models,
            profiles=load_profiles(),
            default_profile="standard",
            prompt_policy=PromptPolicy.load(),
        )
        sheet = load_prompt_sheet(str(SAMPLE_SHEET), rules=SheetRules(models=models))
        plan = plan_sheet(sheet, rules, "run-sample", digests, set())
        assert [entry.reason for entry in plan.rejected + plan.refused] == []
        assert len(plan.clips) == len(expand_variants(sheet.variants)) == 18
