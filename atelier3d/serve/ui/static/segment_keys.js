// Keyboard shortcuts of the Segment tab: A add, R remove, B box corner, N new object,
// Ctrl/Cmd+Z undo, Ctrl/Cmd+Shift+Z or Ctrl+Y redo. They press the tab's own controls, so
// each does exactly what the click on that control does (on either click path).

const MODES = {a: 'add', r: 'remove', b: 'box'};

function typing(target) {
  return target instanceof HTMLElement
    && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName)
        && !['radio', 'checkbox', 'button'].includes(target.type));
}

function press(id) {
  const button = document.getElementById(id);
  if (button && !button.disabled) button.click();
}

function chooseMode(word) {
  for (const input of document.querySelectorAll('#click-mode input[type=radio]')) {
    const label = `${input.value} ${input.parentElement?.textContent ?? ''}`;
    if (label.includes(word)) {
      input.click();
      return;
    }
  }
}

document.addEventListener('keydown', (event) => {
  const overlay = document.getElementById('overlay');
  if (!overlay || overlay.offsetParent === null || typing(event.target) || event.altKey) return;
  const key = event.key.toLowerCase();
  const command = event.ctrlKey || event.metaKey;
  if (command && key === 'z') press(event.shiftKey ? 'redo' : 'undo');
  else if (command && key === 'y') press('redo');
  else if (command) return;
  else if (key in MODES) chooseMode(MODES[key]);
  else if (key === 'n') press('new-object');
  else return;
  event.preventDefault();
});
