"""utils/errors.py: one hierarchy of user errors, each reported by main.py as one line with exit status 2."""
import inspect

import pytest

import main
from utils import errors


USER_ERROR_CLASSES = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
                      if issubclass(cls, Exception) and cls is not errors.UserError]


def test_every_error_of_the_module_is_a_user_error_and_listed():
    assert {cls.__name__ for cls in USER_ERROR_CLASSES} == set(errors.__all__) - {'UserError'}
    assert all(issubclass(cls, errors.UserError) for cls in USER_ERROR_CLASSES)


def test_there_is_one_checkpoint_error():
    from utils import checkpoint, inference
    assert checkpoint.CheckpointError is inference.CheckpointError is errors.CheckpointError


@pytest.mark.parametrize('cls', USER_ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_main_reports_any_user_error_in_one_line_with_status_2(cls, monkeypatch, capsys):
    error = cls('/data/x.png', 'the reason') if issubclass(cls, errors.BadImageError) else cls('the reason')

    def failing_run(args, resources, *rest):
        raise error
    monkeypatch.setattr(main, 'run', failing_run)
    assert main.main(['--data_path', 'd']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'the reason' in err and err.count('\n') == 1 and 'Traceback' not in err


def test_a_bug_is_not_a_user_error(monkeypatch):
    def failing_run(args, resources, *rest):
        raise KeyError('a bug')
    monkeypatch.setattr(main, 'run', failing_run)
    with pytest.raises(KeyError):
        main.main(['--data_path', 'd'])


def test_bad_image_error_survives_a_trip_through_a_worker_process():
    import pickle
    error = pickle.loads(pickle.dumps(errors.UnreadableDatasetError('/data/train', '50 unreadable images')))
    assert type(error) is errors.UnreadableDatasetError
    assert (error.path, error.reason, str(error)) == ('/data/train', '50 unreadable images',
                                                      '/data/train: 50 unreadable images')


def test_the_tools_model_loader_turns_the_models_packages_errors_into_a_checkpoint_error(tmp_path):
    from utils.inference import load_model
    with pytest.raises(errors.CheckpointError, match='not found'):
        load_model(tmp_path / 'missing.pth')
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    with pytest.raises(errors.CheckpointError, match='text.pth'):
        load_model(tmp_path / 'text.pth')
