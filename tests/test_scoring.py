from sleepctl.grounding import grounded
from sleepctl.prompts import entities, parse_questions
from sleepctl.scoring import contains_match, normalize, token_f1


def test_normalize_numbers_and_articles():
    assert normalize("The Eleven dogs!") == "11 dogs"
    assert normalize("twenty-one") == "21"
    assert normalize("1,200 dollars") == "1200 dollars"
    assert normalize("version 3.1.") == "version 3.1"


def test_contains_match():
    assert contains_match("The queries ran 11 times faster.", "eleven")
    assert contains_match("It now runs in Tallinn, Estonia.", "Tallinn")
    assert not contains_match("It runs in Tallinna.", "Tallinn")  # whole words only
    assert contains_match("Samples go at minus 80 degrees", "minus 80 degrees")
    assert not contains_match("anything", "")


def test_number_words_and_ordinals_match_digits():
    assert contains_match("About 200 people came.", "two hundred")
    assert contains_match("There were two hundred of them.", "200")
    assert contains_match("It is due on March 14th.", "March 14")
    assert contains_match("It is due on the fourteenth of March", "14th of March")
    assert contains_match("The standup is at ten past nine, room twelve", "room 12")
    assert contains_match("one hundred and five tickets", "105 tickets")
    assert contains_match("She came first.", "1st")
    assert contains_match("a thousand two hundred dollars", "1,200 dollars")
    assert not contains_match("About 2000 people came.", "two hundred")
    assert not contains_match("It is due on March 4th.", "March 14")
    assert normalize("Route Sixty-Six") == "route 66"


def test_token_f1():
    assert token_f1("Dana Okafor", "Dana Okafor") == 1.0
    assert 0 < token_f1("It was Dana", "Dana Okafor") < 1
    assert token_f1("nothing", "Dana") == 0.0


def test_grounded():
    mem = "The Kestrel build server moved to Tallinn."
    assert grounded("The Kestrel server is in Tallinn.", mem)
    assert not grounded("Kestrel is a German gaming startup founded in 1999.", mem)


def test_parse_questions_and_entities():
    text = "1. Where is the Kestrel server?\n2) Who moved it? extra\nNot a question\n- Where is the Kestrel server?"
    assert parse_questions(text, 5) == ["Where is the Kestrel server?", "Who moved it?"]
    ents = entities("Heads up: Orla Brennick moved the Kestrel build server. Orla Brennick did it on Tuesday.", 3)
    assert ents[0] == "Orla Brennick" and "Kestrel" in ents and "Heads" not in ents
    assert "REDACTED" not in " ".join(entities("Orla set [REDACTED:password] on Kestrel. [REDACTED:aws_key] too.", 5))
