"""Drive Label Studio's labelling page in headless Chromium (run with .venv-labelstudio's python: selenium lives there).

    python tests/labelstudio_browser.py URL EMAIL PASSWORD PROJECT_ID TASK_ID SCREENSHOT.png [SIDE]

Logs in, opens the task, picks the brush label 'good', paints one stroke across the
middle of the image, saves a screenshot and submits. Prints one JSON line with what it did.
With SIDE (A or B: the pairwise page, two images side by side with a brush each) it picks
that image's 'good' (the first or second on the page) and paints on that image (the left or
right of the two largest canvases).
"""

import json
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait


def main(url, email, password, project_id, task_id, shot, side=None):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,1000",
              f"--user-data-dir={tempfile.mkdtemp(prefix='pxpo-chromium-')}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    wait = WebDriverWait(driver, 90, ignored_exceptions=(StaleElementReferenceException,))  # the page re-renders as it loads
    try:
        driver.get(f"{url}/user/login/")
        wait.until(EC.presence_of_element_located((By.NAME, "email"))).send_keys(email)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        wait.until(lambda d: "/user/login" not in d.current_url)
        driver.get(f"{url}/projects/{project_id}/data?task={task_id}")
        # the label button of the BrushLabels control, then the image's canvas
        good = "//*[contains(@class,'label__text') and normalize-space(.)='good']"
        label = wait.until(EC.element_to_be_clickable((By.XPATH, good)))
        canvas = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".konvajs-content canvas, canvas")))
        time.sleep(2.0)  # the image loads into the canvas
        k = 0 if side in (None, "A") else 1
        if side is not None:
            wait.until(lambda d: len(d.find_elements(By.XPATH, good)) >= 2 and len(d.find_elements(By.CSS_SELECTOR, ".konvajs-content")) >= 2)
        wait.until(lambda d: d.find_elements(By.XPATH, good)[k].click() or True)  # found afresh: an earlier element may be stale
        time.sleep(0.5)
        stages = driver.find_elements(By.CSS_SELECTOR, ".konvajs-content") or [canvas]
        if side is None:
            stage = max(stages, key=lambda e: e.size["width"] * e.size["height"])  # the image's stage, not a thumbnail
        else:  # the two images' stages, left (A) and right (B)
            two = sorted(stages, key=lambda e: e.size["width"] * e.size["height"])[-2:]
            stage = sorted(two, key=lambda e: e.location["x"])[k]
        w, h, x = stage.size["width"], stage.size["height"], stage.location["x"]
        ActionChains(driver).move_to_element_with_offset(stage, -w // 4, 0).click_and_hold().pause(0.2) \
            .move_by_offset(w // 8, 0).pause(0.1).move_by_offset(w // 8, 0).pause(0.1).move_by_offset(w // 8, 0).pause(0.1) \
            .release().perform()
        time.sleep(1.0)
        driver.save_screenshot(shot)
        submit = wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space(.)='Submit' or normalize-space(.)='Update']")))
        submit.click()
        time.sleep(3.0)
        print(json.dumps({"stage_size": [w, h], "stage_x": x, "side": side, "url": driver.current_url, "screenshot": shot}))
    finally:
        driver.quit()


if __name__ == "__main__":
    main(*sys.argv[1:8])
