"""scripts/build_supplement.py: the DocBook text of the built-in model's second training stage."""

import importlib.util

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("build_supplement", ROOT / "scripts" / "build_supplement.py")
build_supplement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_supplement)


def test_docbook_paragraphs_keep_prose_expand_entities_and_drop_code(tmp_path):
    (tmp_path / "gui.dtd").write_text('<!ENTITY appname "GnuCash">\n'
                                      '<!ENTITY app "<application>&appname;</application>">\n', encoding="utf-8")
    (tmp_path / "index.docbook").write_text('<!DOCTYPE book [\n<!ENTITY guide "Tutorial">\n]>\n<book/>',
                                            encoding="utf-8")
    chapter = tmp_path / "ch_bank.xml"
    chapter.write_text(
        '<chapter id="c"><title>Banking with &app;</title>\n'
        '<para>Deposit money in the <emphasis>bank</emphasis>\n account.<screen>$ gnucash --help</screen> Then '
        'reconcile &unknown; it.</para><!-- a <para>comment</para> -->\n'
        '<itemizedlist><listitem><para>A loan &amp; its interest in the &guide;.</para></listitem></itemizedlist>'
        '<figure><title>A picture</title><mediaobject>x</mediaobject></figure></chapter>', encoding="utf-8")
    entities = build_supplement.entity_table(str(tmp_path))
    assert entities["app"] == "<application>GnuCash</application>" and entities["guide"] == "Tutorial"
    assert build_supplement.docbook_paragraphs(str(chapter), entities) == [
        "Banking with GnuCash", "Deposit money in the bank account. Then reconcile it.",
        "A loan & its interest in the Tutorial."]
