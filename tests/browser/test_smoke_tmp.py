from tests.browser.conftest import PASSWORD, shot

def test_smoke(scene, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(scene.url + "/")
    page.fill("#name", "vanhanh"); page.fill("#password", PASSWORD); page.click("form#login button")
    page.wait_for_selector("#devices tbody tr")
    shot(page, "smoke-fleet")
    page.goto(scene.clerk_url + "/")
    shot(page, "smoke-clerk")
    print(errors)
